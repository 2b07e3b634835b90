"""A fake llama-server speaking the real HTTP API, with knobs for faults.

Run as a real process (``python -m tests.fakes.llama_server --port N ...``) so
pool tests exercise spawning, readiness, signals and crashes for real. It
accepts the flags the router passes and ignores the ones it does not model.

Knobs:
  --load-delay S        /health answers 503 "Loading model" for S seconds.
  --token-delay S       pause between streamed tokens.
  --exit-at-start CODE  print --exit-message to stderr and exit before binding.
  --crash-after-tokens N  os._exit(137-style) after N streamed tokens in total.
  --ignore-sigterm      keep running on SIGTERM (the router must SIGKILL).
  --stats-file PATH     after each request, write {"max_concurrent", "requests",
                        "embedding_inputs"} there (requests counts every completion and
                        embeddings POST; embedding_inputs lists each embeddings POST's input count).
  --port-taken-once MARKER  the first start (no MARKER file yet) fails as if its port
                        were taken, like llama-server losing a race for a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

WORDS = ("alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alias", default="fake")
    parser.add_argument("--api-key-file")
    parser.add_argument("--embedding", action="store_true")
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--exit-at-start", type=int)
    parser.add_argument("--exit-message", default="error: failed to load model")
    parser.add_argument("--crash-after-tokens", type=int)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--stats-file")
    parser.add_argument("--port-taken-once")
    args, _ = parser.parse_known_args(argv)  # the router's other llama-server flags
    return args


class Fake:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ready_at = time.monotonic() + args.load_delay
        self.key = Path(args.api_key_file).read_text().strip() if args.api_key_file else ""
        self.tokens = 0
        self.current = 0
        self.max_concurrent = 0
        self.requests = 0
        self.embedding_inputs: list[int] = []

    def _authorized(self, request: web.Request) -> bool:
        return not self.key or request.headers.get("Authorization") == f"Bearer {self.key}"

    def _write_stats(self) -> None:
        if self.args.stats_file:
            stats = {
                "max_concurrent": self.max_concurrent,
                "requests": self.requests,
                "embedding_inputs": self.embedding_inputs,
            }
            Path(self.args.stats_file).write_text(json.dumps(stats))

    async def health(self, request: web.Request) -> web.Response:
        if time.monotonic() < self.ready_at:
            return web.json_response(
                {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}},
                status=503,
            )
        return web.json_response({"status": "ok"})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"error": {"type": "authentication_error"}}, status=401)
        body = await request.json()
        chat = request.path.endswith("chat/completions")
        max_tokens = int(body.get("max_tokens", 16))
        if max_tokens > 100000:
            return web.json_response(
                {"error": {"message": "context too long", "type": "exceed_context_size_error"}},
                status=400,
            )
        self.current += 1
        self.requests += 1
        self.max_concurrent = max(self.max_concurrent, self.current)
        try:
            if body.get("stream"):
                return await self._stream(request, chat, max_tokens)
            words = [WORDS[i % len(WORDS)] for i in range(max_tokens)]
            await asyncio.sleep(self.args.token_delay * max_tokens)
            text = " " + " ".join(words)
            choice: dict[str, object] = {"index": 0, "finish_reason": "length"}
            choice.update(
                {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            )
            return web.json_response(
                {
                    "choices": [choice],
                    "model": self.args.alias,
                    "object": "chat.completion" if chat else "text_completion",
                    "usage": {
                        "prompt_tokens": 3,
                        "completion_tokens": max_tokens,
                        "total_tokens": 3 + max_tokens,
                    },
                }
            )
        finally:
            self.current -= 1
            self._write_stats()

    async def _stream(
        self, request: web.Request, chat: bool, max_tokens: int
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(max_tokens):
            if (
                self.args.crash_after_tokens is not None
                and self.tokens >= self.args.crash_after_tokens
            ):
                os._exit(9)
            self.tokens += 1
            word = " " + WORDS[i % len(WORDS)]
            last = i == max_tokens - 1
            choice: dict[str, object] = {"index": 0, "finish_reason": "length" if last else None}
            choice.update({"delta": {"content": word}} if chat else {"text": word})
            chunk: dict[str, object] = {"choices": [choice], "model": self.args.alias}
            if last:
                chunk["timings"] = {"cache_n": 0, "prompt_n": 3, "predicted_n": max_tokens}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if self.args.token_delay:
                await asyncio.sleep(self.args.token_delay)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"type": "authentication_error"}}, status=401)
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.requests += 1
        self.embedding_inputs.append(len(inputs))
        self._write_stats()
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(str(x))), float(i), 1.0]}
            for i, x in enumerate(inputs)
        ]
        return web.json_response(
            {"data": data, "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}
        )


def main() -> None:
    args = parse_args()
    if args.port_taken_once and not Path(args.port_taken_once).exists():
        Path(args.port_taken_once).touch()
        print("couldn't bind HTTP server socket, hostname: 127.0.0.1", file=sys.stderr, flush=True)
        sys.exit(1)
    if args.exit_at_start is not None:
        print(args.exit_message, file=sys.stderr, flush=True)
        sys.exit(args.exit_at_start)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fake = Fake(args)
    app = web.Application()
    app.router.add_get("/health", fake.health)
    app.router.add_post("/v1/chat/completions", fake.completions)
    app.router.add_post("/v1/completions", fake.completions)
    app.router.add_post("/v1/embeddings", fake.embeddings)
    print(f"fake llama-server for {args.model} on {args.port}", file=sys.stderr, flush=True)
    web.run_app(
        app, host=args.host, port=args.port, print=None, handle_signals=not args.ignore_sigterm
    )


if __name__ == "__main__":
    main()
