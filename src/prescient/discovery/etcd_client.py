"""A small etcd v3 client over etcd's JSON gateway (`POST /v3/...`), for discovery only.

Why not a gRPC client: etcd serves the same v3 API as JSON over HTTP on its client port
(enabled by default since 3.3; `/v3/` paths since 3.4), and upstream Llumnix's Python sidecar
uses exactly this. Talking JSON keeps the runtime on aiohttp, which every service already
uses, instead of adding grpcio and a gRPC etcd library (aetcd works with the pinned grpcio and
protobuf today, but would tie our runtime to its generated-code versions and it takes a single
host, not an endpoint list). The calls discovery needs are few: range over a prefix, put,
delete, watch a prefix, and lease grant / keep-alive / revoke.

Endpoints are tried in order; the first that answers stays in use until it fails. With
`username`, a token from `/v3/auth/authenticate` is sent in `Authorization` and renewed when
etcd rejects it (simple tokens expire and are per member). Keys and values travel base64-
encoded; 64-bit numbers as decimal strings, as the gateway's JSON mapping requires.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import aiohttp
import msgspec

from prescient.discovery.registrar import DiscoveryError

log = logging.getLogger(__name__)

GRPC_NOT_FOUND = 5
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16
_INVALID_TOKEN = "invalid auth token"
_UNREACHABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


class EtcdError(DiscoveryError):
    """etcd failed or refused a call; `code` is the gRPC status code when etcd sent one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class WatchEvent(msgspec.Struct, frozen=True):
    """One change under a watched prefix."""

    kind: Literal["PUT", "DELETE"]
    key: str
    value: bytes  # empty for DELETE


def prefix_range_end(prefix: bytes) -> bytes:
    """The `range_end` that makes a range or watch cover every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def normalize_endpoint(text: str) -> str:
    """`host:port` or `http(s)://host:port` -> a base URL."""
    text = text.strip().rstrip("/")
    return text if text.startswith(("http://", "https://")) else "http://" + text


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


class EtcdClient:
    """The discovery subset of etcd's v3 API over HTTP/JSON.

    Args:
        endpoints: `host:port` or URLs, tried in order.
        username, password: etcd credentials (only sent when `username` is set).
        dial_timeout_s: connect timeout, and the whole-call timeout of a unary call.
    """

    def __init__(self, endpoints: Sequence[str], *, username: str = "", password: str = "",
                 dial_timeout_s: float = 5.0) -> None:
        if not endpoints:
            raise DiscoveryError("etcd: no endpoints given")
        self._endpoints = [normalize_endpoint(e) for e in endpoints]
        self._username, self._password = username, password
        self._dial_timeout_s = dial_timeout_s
        self._active = 0  # index of the endpoint in use
        self._tokens: dict[str, str] = {}  # endpoint -> auth token (simple tokens are per member)
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    async def range_prefix(self, prefix: str) -> tuple[int, list[tuple[str, bytes]]]:
        """`(revision, [(key, value)])` of every key under `prefix`, as of one revision."""
        raw = prefix.encode()
        data = await self.call("/v3/kv/range",
                               {"key": _b64(raw), "range_end": _b64(prefix_range_end(raw))})
        kvs = [(_unb64(kv.get("key")).decode(errors="replace"), _unb64(kv.get("value")))
               for kv in data.get("kvs", [])]
        return int(data.get("header", {}).get("revision", 0)), kvs

    async def put(self, key: str, value: bytes, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        await self.call("/v3/kv/put", body)

    async def delete(self, key: str) -> None:
        await self.call("/v3/kv/deleterange", {"key": _b64(key.encode())})

    async def grant(self, ttl_s: int) -> int:
        """A new lease of `ttl_s` seconds; its id."""
        data = await self.call("/v3/lease/grant", {"TTL": str(ttl_s)})
        if data.get("error"):
            raise EtcdError(f"etcd: lease grant failed: {data['error']}")
        return int(data["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew `lease`; its new TTL in seconds, 0 when it no longer exists."""
        data = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """Revoke `lease`, deleting its keys; a lease already gone is not an error."""
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if exc.code != GRPC_NOT_FOUND:
                raise

    async def watch_prefix(self, prefix: str, start_revision: int,
                           on_events: Callable[[list[WatchEvent]], None]) -> None:
        """Stream changes under `prefix` from `start_revision` into `on_events`.

        Returns when etcd ends the stream. Raises `EtcdError` when no endpoint accepts the
        watch, the stream breaks, or etcd cancels it (e.g. `start_revision` was compacted);
        the caller re-reads and watches again.
        """
        raw = prefix.encode()
        body = {"create_request": {"key": _b64(raw), "range_end": _b64(prefix_range_end(raw)),
                                   "start_revision": str(start_revision)}}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._dial_timeout_s)
        endpoint = self._endpoints[self._active]
        try:
            async with await self._open(endpoint, "/v3/watch", body, timeout) as resp:
                if resp.status != 200:
                    _reply(endpoint, "/v3/watch", resp.status, await resp.read())  # raises
                async for line in resp.content:
                    if line.strip():
                        events = _watch_events(json.loads(line), endpoint)
                        if events:
                            on_events(events)
        except _UNREACHABLE as exc:
            self._failover(endpoint)
            raise EtcdError(f"etcd {endpoint}: watch stream broke: {exc or type(exc).__name__}",
                            GRPC_UNAVAILABLE) from None
        except ValueError as exc:
            raise EtcdError(f"etcd {endpoint}: bad watch response: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `path` on the first endpoint that answers; the decoded reply.

        Raises:
            EtcdError: every endpoint is unreachable, or etcd answered with an error.
        """
        errors: list[str] = []
        for _ in range(len(self._endpoints)):
            endpoint = self._endpoints[self._active]
            try:
                return await self._call_endpoint(endpoint, path, body)
            except _UNREACHABLE as exc:
                errors.append(f"{endpoint}: {exc or type(exc).__name__}")
                self._failover(endpoint)
            except EtcdError as exc:
                if exc.code != GRPC_UNAVAILABLE:  # e.g. "no leader": another member may do
                    raise
                errors.append(f"{endpoint}: {exc}")
                self._failover(endpoint)
        raise EtcdError(f"etcd: no endpoint answered {path} ({'; '.join(errors)})",
                        GRPC_UNAVAILABLE)

    def _failover(self, endpoint: str) -> None:
        if self._endpoints[self._active] == endpoint:
            self._active = (self._active + 1) % len(self._endpoints)

    async def _call_endpoint(self, endpoint: str, path: str,
                             body: dict[str, Any]) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self._dial_timeout_s)
        async with await self._open(endpoint, path, body, timeout) as resp:
            return _reply(endpoint, path, resp.status, await resp.read())

    async def _open(self, endpoint: str, path: str, body: dict[str, Any],
                    timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """POST with the auth token; a rejected token is renewed and the call made once more."""
        resp = await self._post(endpoint, path, body, timeout)
        if resp.status == 401 and self._username:
            resp.release()
            self._tokens.pop(endpoint, None)
            resp = await self._post(endpoint, path, body, timeout)
        return resp

    async def _post(self, endpoint: str, path: str, body: dict[str, Any],
                    timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        headers = await self._auth_headers(endpoint, timeout)
        return await self._client().post(endpoint + path, json=body, headers=headers,
                                         timeout=timeout)

    async def _auth_headers(self, endpoint: str, timeout: aiohttp.ClientTimeout) -> dict[str, str]:
        if not self._username:
            return {}
        if endpoint not in self._tokens:
            body = {"name": self._username, "password": self._password}
            async with self._client().post(endpoint + "/v3/auth/authenticate", json=body,
                                           timeout=timeout) as resp:
                data = _reply(endpoint, "/v3/auth/authenticate", resp.status, await resp.read())
            self._tokens[endpoint] = str(data.get("token", ""))
        return {"Authorization": self._tokens[endpoint]}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # made lazily: a session needs the running event loop
            self._session = aiohttp.ClientSession()
        return self._session


def _reply(endpoint: str, path: str, status: int, raw: bytes) -> dict[str, Any]:
    """The JSON reply of a unary call, or `EtcdError` with etcd's message and code."""
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        raise EtcdError(f"etcd {endpoint}{path}: HTTP {status}, not JSON: {raw[:200]!r}"
                        ) from None
    if status == 200 and isinstance(data, dict):
        return data
    detail = data if isinstance(data, dict) else {}
    code = detail.get("code")
    message = detail.get("message") or detail.get("error") or f"HTTP {status}"
    if status == 401 or _INVALID_TOKEN in str(message):
        code = GRPC_UNAUTHENTICATED
    raise EtcdError(f"etcd {endpoint}{path}: {message}", code if isinstance(code, int) else None)


def _watch_events(message: Any, endpoint: str) -> list[WatchEvent]:
    """The events of one watch response; `EtcdError` if etcd cancelled the watch."""
    if not isinstance(message, dict):
        raise EtcdError(f"etcd {endpoint}: bad watch response: {message!r:.200}")
    if "error" in message:
        error = message["error"]
        detail = error.get("message", error) if isinstance(error, dict) else error
        raise EtcdError(f"etcd {endpoint}: watch failed: {detail}")
    result = message.get("result", {})
    if result.get("canceled"):
        reason = result.get("cancel_reason") or (
            f"revision compacted to {result['compact_revision']}"
            if result.get("compact_revision") else "cancelled by etcd")
        raise EtcdError(f"etcd {endpoint}: watch cancelled: {reason}")
    return [WatchEvent("DELETE" if ev.get("type") == "DELETE" else "PUT",
                       _unb64(ev.get("kv", {}).get("key")).decode(errors="replace"),
                       _unb64(ev.get("kv", {}).get("value")))
            for ev in result.get("events", [])]
