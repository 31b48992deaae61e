"""The llumlet's gRPC service (`llumlet.Llumlet`, reference §7.4): server binding and client.

Upstream's rescheduler calls `Migrate` on the source instance's llumlet; the source's llumlet
talks to the destination's (`MigrateIn`, `AbortMigrateIn`); `Abort` stops requests wherever they
run now. The messages are the generated `llumlet_server_pb2` classes (upstream's field numbers).
Methods are bound by name with grpc's generic handlers, so no generated stub module is needed.

A servicer's method may raise `LlumletRpcError(code, message)` to answer with a gRPC status
(upstream: `INVALID_ARGUMENT` for a value that does not match the migration type,
`RESOURCE_EXHAUSTED` when no migration slot is free); any other exception is logged and answered
`INTERNAL`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

from prescient.cms.proto import cms_pb2
from prescient.errors import PrescientError
from prescient.llumlet.proto import llumlet_server_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "llumlet.Llumlet"

# method -> (request type, response type)
_METHODS: dict[str, tuple[Any, Any]] = {
    "Migrate": (pb.MigrateRequest, pb.MigrateResponse),
    "Abort": (pb.AbortRequests, pb.AbortResponse),
    "MigrateIn": (pb.MigrateInRequest, pb.MigrateInResponse),
    "AbortMigrateIn": (pb.AbortMigrateInRequest, pb.AbortResponse),
    "PushInstanceStatus": (cms_pb2.InstanceStatus, pb.PushInstanceStatusResponse),
    "ForwardOutputs": (pb.ForwardOutputsRequest, pb.ForwardOutputsResponse),
}


class LlumletRpcError(PrescientError):
    """A call answered with a gRPC status other than OK (or one that never got an answer)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class LlumletServicer(Protocol):
    """What a llumlet serves; each method gets the request message, returns the response."""

    async def migrate(self, request: pb.MigrateRequest) -> pb.MigrateResponse: ...

    async def abort(self, request: pb.AbortRequests) -> pb.AbortResponse: ...

    async def migrate_in(self, request: pb.MigrateInRequest) -> pb.MigrateInResponse: ...

    async def abort_migrate_in(self, request: pb.AbortMigrateInRequest) -> pb.AbortResponse: ...

    async def push_instance_status(
        self, request: cms_pb2.InstanceStatus) -> pb.PushInstanceStatusResponse: ...

    async def forward_outputs(
        self, request: pb.ForwardOutputsRequest) -> pb.ForwardOutputsResponse: ...


_ATTRS = {"Migrate": "migrate", "Abort": "abort", "MigrateIn": "migrate_in",
          "AbortMigrateIn": "abort_migrate_in", "PushInstanceStatus": "push_instance_status",
          "ForwardOutputs": "forward_outputs"}


def _handler(method: str, fn: Callable[[Any], Awaitable[Any]]) -> grpc.RpcMethodHandler:
    request_type, response_type = _METHODS[method]

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(request)
        except LlumletRpcError as e:
            await context.abort(e.code, e.message)
        except Exception:
            log.exception("llumlet %s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method} failed")

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString)


async def start_server(servicer: LlumletServicer, host: str, port: int) -> tuple[grpc.aio.Server,
                                                                              int]:
    """Serve `servicer` on host:port (0: a free port); returns the server and its port.

    Raises:
        OSError: the address cannot be bound.
    """
    handlers = {m: _handler(m, getattr(servicer, attr)) for m, attr in _ATTRS.items()}
    # grpc shares a port with SO_REUSEPORT by default: a port in use would split the traffic
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # some grpc versions raise for a busy port, others return 0
        raise OSError(f"cannot listen on {host}:{port}: {e}") from None
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    return server, bound


class LlumletClient:
    """Calls llumlets by address ("host:port"), one channel per address, kept open.

    `timeout_s` bounds every call (upstream: 5 s). Failures raise `LlumletRpcError`.
    """

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def migrate(self, address: str, request: pb.MigrateRequest) -> pb.MigrateResponse:
        return await self._call(address, "Migrate", request)

    async def abort(self, address: str, request_ids: list[str]) -> pb.AbortResponse:
        return await self._call(address, "Abort", pb.AbortRequests(request_ids=request_ids))

    async def migrate_in(self, address: str, payload: bytes,
                         serialization_format: str) -> pb.MigrateInResponse:
        return await self._call(address, "MigrateIn", pb.MigrateInRequest(
            serialized_migrate_req=payload, serialization_format=serialization_format))

    async def abort_migrate_in(self, address: str, request_ids: list[str]) -> pb.AbortResponse:
        host, _, port = address.rpartition(":")
        return await self._call(address, "AbortMigrateIn", pb.AbortMigrateInRequest(
            request_ids=request_ids, migrate_in_ip_address=host, migrate_in_port=int(port)))

    async def forward_outputs(self, address: str,
                              request: pb.ForwardOutputsRequest) -> pb.ForwardOutputsResponse:
        return await self._call(address, "ForwardOutputs", request)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    async def _call(self, address: str, method: str, request: Any) -> Any:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        response_type = _METHODS[method][1]
        stub = channel.unary_unary(f"/{SERVICE}/{method}",
                                   request_serializer=type(request).SerializeToString,
                                   response_deserializer=response_type.FromString)
        try:
            return await stub(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise LlumletRpcError(e.code(), e.details() or "") from None
