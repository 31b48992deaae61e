"""`RemoteScheduler`: the `Scheduler` protocol over HTTP, as the gateway calls a scheduler service.

Error mapping is the contract with the gateway (upstream `RemoteBalancer`):

- 429 -> `NoInstanceAvailableError` (the gateway waits and retries);
- anything else that is not a 200 with instances (refused or timed-out connection, 4xx, 5xx,
  bad JSON, an empty result) -> `SchedulerUnavailableError` (the gateway falls back to its
  local round-robin).

Several endpoints are tried in order; the client sticks to the last one that answered. An
endpoint that failed at the transport level is skipped for `retry_after_s`, so a dead scheduler
costs one connection attempt per interval instead of a timeout per request. This stands in for
upstream's websocket `/keepalive`, which this client does not implement (the scheduler side
frees lite-mode state on release, not on disconnect).

`release` retries 3 times 500 ms apart (upstream) and never raises; `report` is best effort
and never raises either. Failures are logged once per streak, not once per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp
import msgspec

from prescient.discovery.base import parse_endpoint
from prescient.errors import ConfigError
from prescient.scheduler.wire import (
    LLMInstance,
    NoInstanceAvailableError,
    ReportItem,
    ScheduleRequest,
    SchedulerUnavailableError,
)

_log = logging.getLogger(__name__)

RELEASE_TRIES = 3
RELEASE_RETRY_INTERVAL_S = 0.5
MAX_CONNECTIONS = 128  # per scheduler: a burst waits for a connection, not thousands of connects


class _Answer(msgspec.Struct):
    """The part of the `/schedule` echo the gateway needs (the token ids are skipped)."""

    scheduling_result: list[LLMInstance] = msgspec.field(default_factory=list)


_RESULT_DECODER = msgspec.json.Decoder(_Answer)
_ENCODER = msgspec.json.Encoder()
_JSON = {"Content-Type": "application/json"}


class _Failure(Exception):
    """One endpoint's failed call; `transport` when the scheduler could not be reached."""

    def __init__(self, message: str, *, transport: bool, status: int = 0) -> None:
        super().__init__(message)
        self.transport = transport
        self.status = status  # the HTTP status of a refusal


def base_url(endpoint: str) -> str:
    """`host:port`, `http://host:port[/]` or `https://...` -> the URL prefix of the routes."""
    text = endpoint.strip().rstrip("/")
    if text.startswith(("http://", "https://")):
        return text
    host, port = parse_endpoint(text, "--scheduler-endpoints")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class RemoteScheduler:
    """A client of one or more scheduler services.

    Args:
        endpoints: scheduler addresses, `host:port` or `http(s)://host:port`, in order of
            preference.
        service_token: sent as `Authorization: <token>` when set.
        timeout_s: per call (upstream's HTTP timeout is 2 s).
        retry_after_s: how long an unreachable endpoint is skipped.
        clock: seconds, monotonic.

    Raises:
        ConfigError: no endpoints, or one that is not host:port.
    """

    def __init__(
        self, endpoints: Sequence[str], *, service_token: str = "", timeout_s: float = 2.0,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not endpoints:
            raise ConfigError("--scheduler-endpoints: at least one scheduler endpoint is needed")
        self.urls = [base_url(e) for e in endpoints]
        self._headers = {**_JSON, "Authorization": service_token} if service_token else _JSON
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._current = 0  # index of the endpoint that answered last
        self._down_until = [0.0] * len(self.urls)
        self._refused = [0] * len(self.urls)  # the status of the last logged refusal
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._release_failing = False  # log the first failed release of a streak only

    # ---- the Scheduler protocol --------------------------------------------------------------

    async def schedule(self, request: ScheduleRequest) -> list[LLMInstance]:
        """POST /schedule; see the module docstring for the errors."""
        body = _ENCODER.encode(request)
        status, payload = await self._post_any("/schedule", body)
        if status == 429:
            raise NoInstanceAvailableError(f"no instance available for request {request.id!r}")
        if status != 200:
            raise SchedulerUnavailableError(f"scheduler answered {status}: {_message(payload)}")
        try:
            result = _RESULT_DECODER.decode(payload).scheduling_result
        except msgspec.DecodeError as e:
            raise SchedulerUnavailableError(f"scheduler answered bad JSON: {e}") from None
        if not result:
            raise SchedulerUnavailableError("scheduler answered 200 without instances")
        return result

    async def release(self, request: ScheduleRequest) -> None:
        """POST /release, up to 3 tries 500 ms apart; failures are logged, never raised."""
        body = _ENCODER.encode(request)
        for attempt in range(1, RELEASE_TRIES + 1):
            try:
                status, payload = await self._post_any("/release", body)
            except SchedulerUnavailableError as e:
                status, payload = 0, str(e).encode()
            if status == 200:
                self._release_failing = False
                return
            if attempt < RELEASE_TRIES:
                await asyncio.sleep(RELEASE_RETRY_INTERVAL_S)
        level = logging.DEBUG if self._release_failing else logging.WARNING
        self._release_failing = True
        _log.log(level, "release of request %s failed after %d tries: %s", request.id,
                 RELEASE_TRIES, _message(payload))

    async def report(self, items: Sequence[ReportItem]) -> None:
        """POST /report once (best effort: a lost report is superseded by the next)."""
        if not items:
            return
        try:
            status, payload = await self._post_any("/report", _ENCODER.encode(list(items)))
        except SchedulerUnavailableError as e:
            status, payload = 0, str(e).encode()
        if status != 200:
            _log.debug("report of %d items failed: %s", len(items), _message(payload))

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ---- transport ---------------------------------------------------------------------------

    async def _post_any(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST to the current endpoint, then the others in order, skipping those marked down.

        Returns the first answer that is not a failure (a 200 or a 429); raises
        `SchedulerUnavailableError` with the last failure when every endpoint failed.
        """
        if self._closed:
            raise SchedulerUnavailableError("the scheduler client is closed")
        session = self._session or self._open()
        now, n, last = self._clock(), len(self.urls), "every scheduler endpoint is marked down"
        for k in range(n):
            i = (self._current + k) % n
            if self._down_until[i] > now:
                continue
            try:
                answer = await self._post(session, self.urls[i] + path, body)
            except _Failure as e:
                last = f"{self.urls[i]}: {e}"
                if e.transport:
                    self._mark_down(i, now, last)
                else:
                    self._note_refusal(i, e.status, last)
                continue
            self._mark_up(i)
            return answer
        raise SchedulerUnavailableError(last)

    async def _post(self, session: aiohttp.ClientSession, url: str, body: bytes
                    ) -> tuple[int, bytes]:
        try:
            async with session.post(url, data=body, headers=self._headers) as response:
                payload = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise _Failure(f"{type(e).__name__}: {e or 'no answer within the timeout'}",
                           transport=True) from None
        if response.status not in (200, 429):
            raise _Failure(f"HTTP {response.status}: {_message(payload)}", transport=False,
                           status=response.status)
        return response.status, payload

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=MAX_CONNECTIONS,
                                         keepalive_timeout=60.0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    def _mark_down(self, i: int, now: float, reason: str) -> None:
        if self._down_until[i] == 0.0:
            _log.warning("scheduler %s unreachable, skipping it for %g s: %s", self.urls[i],
                         self._retry_after_s, reason)
        self._down_until[i] = now + self._retry_after_s

    def _note_refusal(self, i: int, status: int, reason: str) -> None:
        """Log a refusal (a wrong token, "cms not available") once per status and streak."""
        if self._refused[i] != status:
            _log.warning("scheduler refused a call (falling back): %s", reason)
            self._refused[i] = status

    def _mark_up(self, i: int) -> None:
        if self._down_until[i] != 0.0 or self._refused[i]:
            _log.info("scheduler %s answers again", self.urls[i])
            self._down_until[i] = 0.0
            self._refused[i] = 0
        self._current = i


def _message(payload: bytes) -> str:
    """The message of an `{"error": {"message": ...}}` body, else the body's start."""
    try:
        return str(msgspec.json.decode(payload)["error"]["message"])
    except (msgspec.DecodeError, KeyError, TypeError):
        return payload[:200].decode(errors="replace")
