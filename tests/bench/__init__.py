"""`make bench`: the embedded llama-server alone vs the router vs the full stack.

Not a pytest suite (no `test_*` files here): `python -m tests.bench` starts every process,
drives them from one load-generator process (`tests.bench.loadgen`), prints one table and
writes the same numbers as JSON.
"""
