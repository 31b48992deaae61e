"""Statuses an engine pushes to its llumlet: the receiving end of Prescient's vLLM plugin.

A stock vLLM loads `prescient_vllm` (integrations/vllm) as a stat-logger plugin; at every step
it sends a msgpack map keyed by `InstanceStatus` field names over ZMQ PUSH from the endpoint it
binds, which this receiver connects to (PULL; ZMQ reconnects by itself when the engine
restarts). Each decoded status goes to `on_status` (the llumlet's `push()`), which
keeps only the newest, so the engine's step rate never becomes the CMS write rate.

A message that does not decode is dropped and logged once per kind of error: a plugin of
another version must not take the llumlet down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from prescient.model import InstanceStatus

logger = logging.getLogger(__name__)


class StatusReceiver:
    """Connects to `endpoint` (e.g. `ipc:///tmp/prescient-8000.ipc`, `tcp://10.0.0.1:5600`)
    and passes every pushed status to `on_status` while `run()` runs.

    Raises:
        zmq.ZMQError: from the constructor, when the endpoint is malformed.
    """

    def __init__(self, endpoint: str, on_status: Callable[[InstanceStatus], None]) -> None:
        self.endpoint = endpoint
        self.on_status = on_status
        self.received = 0
        self._decoder = msgspec.msgpack.Decoder(InstanceStatus)
        self._errors_seen: set[str] = set()
        self._ctx = zmq.asyncio.Context()
        self._socket = self._ctx.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)

    async def run(self) -> None:
        """Receive until cancelled; the socket is closed however it ends."""
        try:
            while True:
                self._take(await self._socket.recv())
        finally:
            self._socket.close()
            self._ctx.term()

    def _take(self, payload: bytes) -> None:
        try:
            status = self._decoder.decode(payload)
        except msgspec.DecodeError as exc:
            kind = str(exc).split(" - ")[0]
            if kind not in self._errors_seen:
                self._errors_seen.add(kind)
                logger.warning("llumlet: dropped an engine status that does not decode (%s)",
                               exc)
            return
        self.received += 1
        self.on_status(status)
