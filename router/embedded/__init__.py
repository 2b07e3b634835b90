"""The embedded llama-server (xllamacpp) launcher and the tiny GGUF models used by tests and demos.

`python -m router.embedded` behaves like `llama-server` for the flags the router passes;
`router.embedded.tiny_gguf` writes small deterministic llama-architecture models offline;
`router.embedded.demo` caches the demo models on disk.
"""
