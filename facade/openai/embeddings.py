"""`POST /v1/embeddings`: one batched Embed call, answered in OpenAI's shape."""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

from aiohttp import web

from clients import EmbedResult
from facade.context import call_metadata, priority, read_body, request_id
from facade.keys import CLIENT
from facade.openai.protocol import EncodingFormat, parse_embedding_request

__all__ = ["embeddings", "embeddings_body", "encode_base64"]


async def embeddings(request: web.Request) -> web.Response:
    """OpenAI embeddings for a string, strings, token ids or token id lists."""
    parsed = parse_embedding_request(await read_body(request))
    result = await request.app[CLIENT].embed(
        parsed.model,
        parsed.inputs,
        priority=priority(request),
        request_id=request_id(request),
        metadata=call_metadata(request),
    )
    return web.json_response(embeddings_body(parsed.model, result, parsed.encoding_format))


def embeddings_body(model: str, result: EmbedResult, encoding_format: EncodingFormat) -> Any:
    """The OpenAI response object for `result`."""
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": index,
                "embedding": encode_base64(vector) if encoding_format == "base64" else vector,
            }
            for index, vector in enumerate(result.embeddings)
        ],
        "model": model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.total_tokens},
    }


def encode_base64(vector: list[float]) -> str:
    """The vector as OpenAI's base64: little-endian float32 values."""
    values = array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode()
