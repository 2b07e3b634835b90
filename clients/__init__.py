"""Typed async client for the router's gRPC services (router.v1).

Usage:

```python
import clients

async with clients.RouterClient("127.0.0.1:50051") as client:
    models = await client.list_models()
```
"""

from clients.errors import (
    AuthenticationError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestCancelledError,
    RequestTooLargeError,
    RouterError,
    UnavailableError,
    WrongModelKindError,
    from_rpc_error,
    map_rpc_errors,
)
from clients.events import (
    Chunk,
    Completion,
    EmbedResult,
    End,
    GenerateEvent,
    Loading,
    ModelInfo,
    ModelList,
    Queued,
    ServerInfo,
    StatusSummary,
    Timing,
    Usage,
    WatchEvent,
    WatchEventKind,
)
from clients.router_client import GenerateKind, Priority, RouterClient

__all__ = [
    "AuthenticationError",
    "Chunk",
    "Completion",
    "DeadlineExceededError",
    "EmbedResult",
    "End",
    "GenerateEvent",
    "GenerateKind",
    "InternalError",
    "InvalidRequestError",
    "Loading",
    "ModelInfo",
    "ModelList",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "Priority",
    "Queued",
    "RateLimitError",
    "RequestCancelledError",
    "RequestTooLargeError",
    "RouterClient",
    "RouterError",
    "ServerInfo",
    "StatusSummary",
    "Timing",
    "UnavailableError",
    "Usage",
    "WatchEvent",
    "WatchEventKind",
    "WrongModelKindError",
    "from_rpc_error",
    "map_rpc_errors",
]
