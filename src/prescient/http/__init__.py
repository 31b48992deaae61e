"""The data plane's HTTP/1.1: a minimal server and an upstream client, on asyncio Protocols and
httptools (no framework: see `server`'s docstring for why)."""

from prescient.http.client import (
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
)
from prescient.http.server import (
    DEFAULT_MAX_BODY_BYTES,
    HttpConnection,
    Request,
    Response,
    Router,
    serve,
)

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "HttpConnection",
    "Request",
    "Response",
    "Router",
    "UpstreamClosedError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "serve",
]
