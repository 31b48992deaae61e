"""Live migration between simulated engines: the llumlet gRPC service of `prescient sim-engine`.

The rescheduler calls `Migrate` on the source's llumlet (reference §7.4). The source picks
requests (`SimEngine.select_migrating_out`, §7.3, after the slot pre-check) and moves each one
with the protocol of `rescheduler.migration`, the same the simulator runs (`sim/migration.py`),
here over the network and in real time:

1. pre-copy stages: the destination reserves the blocks filled so far (`MigrateIn` with a
   `Reserve`), the copy takes the modelled link time while the request keeps decoding here;
2. the last stage: reserve what is left, stop the request between two steps (only if the
   reserved blocks still cover it; a step that crossed a block edge meanwhile means one more
   reservation), wait the copy of the rest, and `MigrateIn` with a `Commit`: the destination
   takes the request with its output so far and decodes on without recomputation.

Any failure before the stop (no room or slot there, the request finished or was aborted here,
no convergence) abandons the migration: `AbortMigrateIn` releases the destination's
reservation and the request stays. A commit that fails after the stop loses the request in
transit: its stream ends with `FINISH_LOST` (the server cuts the connection, so a gateway
replays it elsewhere).

The client's stream stays where it is: the API server that took the request keeps answering it
(its `TokenStream`), and whichever engine runs the request now reports its progress there
with `ForwardOutputs` (upstream forwards EngineCoreOutputs to the request's
`queue_server_address` over ZMQ). Tokens are drawn by the stream holder, seeded by the request
id, so a migrated request's text equals an unmigrated run's. A request can move again: the
next commit names the same stream holder, which follows the newest owner for `Abort`. If the
holder's client goes away, `abort_away` aborts the request where it runs; if an owner stops
answering, `watch` ends its streams with `FINISH_LOST`.

Migration payloads are msgpack (`serialization_format` "prescient-msgpack"), not upstream's
pickled vLLM `Request`s: only Prescient engines exchange them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import NoReturn

import grpc
import msgspec

from prescient.cms.codec import decode_status
from prescient.engine import SimEngine
from prescient.errors import ConfigError
from prescient.llumlet.proto import llumlet_server_pb2 as pb
from prescient.llumlet.rpc import LlumletClient, LlumletRpcError
from prescient.model import InstanceStatus, Request
from prescient.rescheduler.migration import (
    MigrationSettings,
    Stage,
    copy_time_s,
    final_blocks,
    full_blocks,
    next_stage,
)
from prescient.rescheduler.plan import SELECT_ORDERS, SELECT_RULES
from prescient.rescheduler.selection import DEFAULT_MAX_REQ_MIG, refuse
from prescient.simengine.driver import FINISH_ABORT, RealtimeEngine, TokenStream
from prescient.simengine.metrics import EngineMetrics

log = logging.getLogger(__name__)

SERIALIZATION_FORMAT = "prescient-msgpack"
FINISH_LOST = "lost"  # the request was lost with the engine running it: cut the stream
_STOP_ATTEMPTS = 3  # last-stage reservations before giving up on a request that keeps growing
_VALUE_FIELD = {"NUM_REQ": "num_reqs", "TOKEN": "num_tokens", "RATIO": "kv_cache_usage_ratio"}


class Reserve(msgspec.Struct, tag="reserve"):
    """Pre-allocate `blocks` more for an incoming request (a pre-copy stage, or the last)."""

    request_id: str
    blocks: int


class Commit(msgspec.Struct, tag="commit"):
    """The request, stopped on its source, with its KV copied: take it and go on."""

    request: Request
    num_output: int  # tokens sampled so far
    num_computed: int  # tokens with KV (0: it was waiting)
    holder: str  # address of the llumlet whose API server holds the client's stream


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Reserve | Commit)


class _Forwarded:
    """Stands in for the client stream of a request that arrived by migration: its progress
    goes to the stream holder, the newest state only, one call at a time, in order."""

    def __init__(self, migration: LiveMigration, request_id: str, num_tokens: int,
                 holder: str) -> None:
        self.migration = migration
        self.request_id = request_id
        self.num_tokens = num_tokens
        self.num_cached_tokens = 0
        self.holder = holder
        self.finish_reason: str | None = None
        self.closed = False  # it left again: its next owner reports from now on
        self._dirty = asyncio.Event()
        self._dirty.set()  # the holder learns the new owner at once
        self.task = asyncio.create_task(self._send(), name=f"forward-{request_id}")

    def _produce(self, total: int, now: float) -> None:
        if total > self.num_tokens:
            self.num_tokens = total
            self._dirty.set()

    def _finish(self, reason: str, now: float) -> None:
        if self.finish_reason is None:
            # an abort here that the holder did not ask for (it forgets a request first when
            # its client leaves) means this engine stopped: the holder cuts the stream, so a
            # gateway replays it, rather than ending it as if the answer were complete
            self.finish_reason = FINISH_LOST if reason == FINISH_ABORT else reason
            self._dirty.set()

    def close(self) -> None:
        """The request moved on from here: stop reporting (without a finish)."""
        self.closed = True
        self._dirty.set()

    async def _send(self) -> None:
        client, rid = self.migration.client, self.request_id
        while not self.closed:
            await self._dirty.wait()
            self._dirty.clear()
            if self.closed:
                return
            reason = self.finish_reason or ""
            try:
                answer = await client.forward_outputs(self.holder, pb.ForwardOutputsRequest(
                    request_id=rid, num_tokens=self.num_tokens, finish_reason=reason,
                    owner_address=self.migration.address))
            except LlumletRpcError as e:
                log.warning("stream holder %s of %s unreachable (%s): aborting it",
                            self.holder, rid, e)
                self.migration.driver.abort(rid)
                self.migration._forwarded.pop(rid, None)
                return
            if not answer.known:  # the client went away meanwhile
                self.migration.driver.abort(rid)
                return
            if reason:
                self.migration._forwarded.pop(rid, None)
                return


class _Moving:
    """A request on its way out: where to, and the blocks reserved and copied there."""

    __slots__ = ("copied", "dst", "reserved", "rid", "stopped")

    def __init__(self, rid: str, dst: str) -> None:
        self.rid = rid
        self.dst = dst
        self.reserved = 0
        self.copied = 0
        self.stopped = False  # taken off this engine: past the point of return


_GROW = object()  # the request needs more blocks reserved before it can stop


class _Away:
    """A request this server answers that runs on another engine now."""

    __slots__ = ("heard", "owner", "stream")

    def __init__(self, stream: TokenStream, owner: str) -> None:
        self.stream = stream
        self.owner = owner
        self.heard = time.monotonic()


class LiveMigration:
    """One sim-engine's side of live migration: the `LlumletServicer` it serves.

    Args:
        driver: the engine in real time.
        instance_id: this instance (a `Migrate` for another source is refused).
        address: "host:port" others reach this llumlet at.
        kv_bytes_per_token: the preset's, for the modelled copy time.
        settings: link bandwidth and slots (`rpc_latency_ms` is the real RPCs' own).
        time_scale: simulated seconds per wall second, as the engine runs.
        timeout_s: bound on every call to another llumlet.
        on_status: where `PushInstanceStatus` statuses go (the llumlet), if anywhere.
        metrics: counts the requests migrated in and out.
    """

    def __init__(self, driver: RealtimeEngine, instance_id: str, address: str, *,
                 kv_bytes_per_token: int, settings: MigrationSettings, time_scale: float = 1.0,
                 timeout_s: float = 5.0,
                 on_status: Callable[[InstanceStatus], None] | None = None,
                 metrics: EngineMetrics | None = None) -> None:
        self.driver = driver
        self.engine: SimEngine = driver.engine
        self.instance_id = instance_id
        self.address = address
        self.kv_bytes = kv_bytes_per_token
        self.settings = settings
        self.time_scale = time_scale
        self.on_status = on_status
        self.metrics = metrics
        self.client = LlumletClient(timeout_s)
        self.silence_s = timeout_s  # an owner this quiet is asked whether it is alive
        self.num_migrated_out = 0  # requests committed on a destination
        self.num_migrated_in = 0
        self._away: dict[str, _Away] = {}
        self._forwarded: dict[str, _Forwarded] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Stop migrations in flight and forwarding; close the channels. Streams running
        elsewhere end as lost: nothing will report them here any more."""
        now = self.driver.now()
        for away in self._away.values():
            away.stream._finish(FINISH_LOST, now)
        self._away.clear()
        tasks = list(self._tasks) + [f.task for f in self._forwarded.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.close()

    # ---- source side ---------------------------------------------------------------------

    async def migrate(self, request: pb.MigrateRequest) -> pb.MigrateResponse:
        rule, order = request.migration_type, request.migration_req_policy
        if rule not in SELECT_RULES or order not in SELECT_ORDERS:
            _invalid(f"unknown migration_type {rule!r} or migration_req_policy {order!r}")
        if request.WhichOneof("migration_value") != _VALUE_FIELD[rule]:
            _invalid(f"migration_type {rule} needs {_VALUE_FIELD[rule]}")
        if request.src_engine_id and request.src_engine_id != self.instance_id:
            _invalid(f"this is {self.instance_id!r}, not {request.src_engine_id!r}")
        if request.dst_engine_id == self.instance_id or not request.dst_engine_port:
            _invalid("the destination must be another instance with a llumlet port")
        value = float(getattr(request, _VALUE_FIELD[rule]))
        free_out = self.settings.max_req_mig_out - self.engine.num_migrating_out
        why = refuse(rule, value, free_out)  # type: ignore[arg-type]
        if why:
            raise LlumletRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        chosen = self.engine.select_migrating_out(
            rule, order, value, max(free_out, 0), self.driver.now())  # type: ignore[arg-type]
        if not chosen:
            return pb.MigrateResponse(success=False, message="no request to migrate")
        dst = f"{request.dst_engine_ip}:{request.dst_engine_port}"
        for rid in chosen:
            task = asyncio.create_task(self._move(rid, dst), name=f"migrate-{rid}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        log.info("migrating %s to %s (%s)", ", ".join(chosen), request.dst_engine_id or dst,
                 request.trigger_policy or "by request")
        return pb.MigrateResponse(success=True, message=f"migrating {len(chosen)} request(s)")

    async def _move(self, rid: str, dst: str) -> None:
        """One request's migration; never raises (a failure before the stop abandons it)."""
        moving = _Moving(rid, dst)
        try:
            if await self._precopy(moving):
                await self._stop_and_commit(moving)
        except asyncio.CancelledError:
            if not moving.stopped:
                self.engine.cancel_migrate_out(rid)
            raise
        except (LlumletRpcError, RuntimeError) as e:
            if not moving.stopped:
                await self._abandon(moving, str(e))

    async def _precopy(self, m: _Moving) -> bool:
        """Pre-copy stages until the last one is due; False when abandoned."""
        bs = self.engine.config.block_size
        stages = 0
        while True:
            tokens = self.engine.migration_kv_tokens(m.rid, self.driver.now())
            if tokens is None:
                return await self._abandon(m, "left the source")
            blocks = full_blocks(tokens, bs) - m.copied
            stage = next_stage(blocks, stages, self.settings)
            if stage is Stage.ABORT:
                return await self._abandon(m, "did not converge")
            stages += 1
            if stage is Stage.FINAL:
                return True
            if not await self._reserve(m, blocks):
                return await self._abandon(m, "no room on the destination")
            await self._copy(blocks)
            m.copied += blocks

    async def _stop_and_commit(self, m: _Moving) -> None:
        bs = self.engine.config.block_size
        for _ in range(_STOP_ATTEMPTS):
            tokens = self.engine.migration_kv_tokens(m.rid, self.driver.now())
            if tokens is None:
                await self._abandon(m, "left the source")
                return
            # the step in flight adds at most one token before the stop
            more = max(0, final_blocks(tokens, bs) - m.reserved) if tokens else 0
            if not await self._reserve(m, more):
                await self._abandon(m, "no room on the destination")
                return
            stopped = await self.driver.between_steps(lambda: self._stop_if_covered(m))
            if stopped is None:
                await self._abandon(m, "left the source")
                return
            if stopped is not _GROW:
                break
        else:
            await self._abandon(m, "kept outgrowing its reservation")
            return
        req, stream = stopped  # type: ignore[misc]
        await self._copy(math.ceil(req.num_computed / bs) - m.copied)
        holder = stream.holder if isinstance(stream, _Forwarded) else self.address
        commit = Commit(request=req.request, num_output=req.num_output,
                        num_computed=req.num_computed, holder=holder)
        try:
            answer = await self.client.migrate_in(m.dst, _ENCODER.encode(commit),
                                                  SERIALIZATION_FORMAT)
            ok, why = answer.success, answer.message
        except LlumletRpcError as e:
            ok, why = False, str(e)
        if not ok:
            log.warning("%s lost in transit to %s: %s", m.rid, m.dst, why)
            if stream is not None:
                stream._finish(FINISH_LOST, self.driver.now())
            return
        self.num_migrated_out += 1
        if self.metrics is not None:
            self.metrics.migrated("out")
        if isinstance(stream, _Forwarded):  # it moved on: its new owner reports from now on
            stream.close()
            self._forwarded.pop(m.rid, None)
        elif isinstance(stream, TokenStream):
            self._away[m.rid] = _Away(stream, m.dst)

    def _stop_if_covered(self, m: _Moving) -> object:
        """Between steps: stop the request here if the reserved blocks hold its KV.

        Returns (the stopped request, its stream), `_GROW` when it needs more blocks first, or
        None when it can no longer leave.
        """
        tokens = self.engine.migration_kv_tokens(m.rid, self.driver.now())
        if tokens is None:
            return None
        if math.ceil(tokens / self.engine.config.block_size) > m.reserved:
            return _GROW
        req = self.engine.migrate_out_stop(m.rid)
        if req is None:
            return None
        m.stopped = True
        return req, self.driver.detach(m.rid)

    async def _reserve(self, m: _Moving, blocks: int) -> bool:
        if blocks <= 0:
            return True
        answer = await self.client.migrate_in(
            m.dst, _ENCODER.encode(Reserve(m.rid, blocks)), SERIALIZATION_FORMAT)
        if answer.success:
            m.reserved += blocks
        return answer.success

    async def _copy(self, blocks: int) -> None:
        seconds = copy_time_s(blocks, self.engine.config.block_size, self.kv_bytes,
                              self.settings)
        await asyncio.sleep(seconds / self.time_scale)

    async def _abandon(self, m: _Moving, why: str) -> bool:
        """Give up before the stop: the request stays here, the destination's reservation
        goes. Returns False (for `_precopy`)."""
        log.info("migration of %s to %s abandoned: %s", m.rid, m.dst, why)
        self.engine.cancel_migrate_out(m.rid)
        if m.reserved:
            with contextlib.suppress(LlumletRpcError):
                await self.client.abort_migrate_in(m.dst, [m.rid])
        return False

    # ---- destination side ----------------------------------------------------------------

    async def migrate_in(self, request: pb.MigrateInRequest) -> pb.MigrateInResponse:
        if request.serialization_format != SERIALIZATION_FORMAT:
            _invalid(f"serialization_format {request.serialization_format!r}: only "
                     f"{SERIALIZATION_FORMAT!r} is understood")
        try:
            order = _DECODER.decode(request.serialized_migrate_req)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            _invalid(f"serialized_migrate_req: {e}")
        if isinstance(order, Reserve):
            return await self._reserve_in(order)
        return await self._commit_in(order)

    async def _reserve_in(self, order: Reserve) -> pb.MigrateInResponse:
        engine = self.engine
        if (not engine.reserved_blocks(order.request_id)  # a new arrival takes a slot
                and engine.num_migrating_in >= self.settings.max_req_mig_in):
            return pb.MigrateInResponse(success=False, message="no free migrate-in slot")
        ok = await self.driver.between_steps(
            lambda: engine.reserve_migrate_in(order.request_id, order.blocks))
        return pb.MigrateInResponse(success=ok, message="" if ok else "no room")

    async def _commit_in(self, order: Commit) -> pb.MigrateInResponse:
        engine, rid = self.engine, order.request.request_id
        if order.num_computed and not engine.reserved_blocks(rid):
            return pb.MigrateInResponse(success=False, message=f"nothing reserved for {rid!r}")

        def commit() -> str:
            req = engine.arriving_request(order.request, order.num_output, order.num_computed,
                                          self.driver.now())
            try:
                engine.commit_migrate_in(req)
            except ValueError as e:  # e.g. a request with its id runs here already
                engine.release_migrate_in(rid)
                return str(e)
            self._forwarded[rid] = sink = _Forwarded(self, rid, order.num_output, order.holder)
            self.driver.adopt(rid, sink)
            return ""

        why = await self.driver.between_steps(commit)
        if why:
            return pb.MigrateInResponse(success=False, message=why)
        self.num_migrated_in += 1
        if self.metrics is not None:
            self.metrics.migrated("in")
        return pb.MigrateInResponse(success=True)

    async def abort_migrate_in(self, request: pb.AbortMigrateInRequest) -> pb.AbortResponse:
        ids = list(request.request_ids)
        await self.driver.between_steps(
            lambda: [self.engine.release_migrate_in(rid) for rid in ids])
        return pb.AbortResponse(success=True)

    # ---- the stream holder ---------------------------------------------------------------

    async def forward_outputs(self, request: pb.ForwardOutputsRequest) -> pb.ForwardOutputsResponse:
        away = self._away.get(request.request_id)
        if away is None:
            return pb.ForwardOutputsResponse(known=False)
        away.heard = time.monotonic()
        stream, now = away.stream, self.driver.now()
        if request.num_tokens >= stream.num_tokens and request.owner_address:
            away.owner = request.owner_address  # the newest owner reports the most tokens
        stream._produce(request.num_tokens, now)
        if request.finish_reason:
            stream._finish(request.finish_reason, now)
            del self._away[request.request_id]
        return pb.ForwardOutputsResponse(known=True)

    def is_away(self, request_id: str) -> bool:
        return request_id in self._away

    def abort_away(self, request_id: str) -> bool:
        """The client of a request running elsewhere went away: abort it where it runs.
        Returns False when the request is not away from here."""
        away = self._away.pop(request_id, None)
        if away is None:
            return False
        away.stream._finish(FINISH_ABORT, self.driver.now())
        task = asyncio.create_task(self._abort_remote(away.owner, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _abort_remote(self, owner: str, request_id: str) -> None:
        try:
            await self.client.abort(owner, [request_id])
        except LlumletRpcError as e:
            log.info("abort of %s at %s failed: %s", request_id, owner, e)

    async def watch(self) -> None:
        """Forever: an owner that has sent nothing for `silence_s` is asked whether it is
        alive (an empty `Abort`); its streams end with `FINISH_LOST` when it does not answer."""
        while True:
            await asyncio.sleep(min(1.0, self.silence_s / 2))
            quiet = time.monotonic() - self.silence_s
            owners = {a.owner for a in self._away.values() if a.heard < quiet}
            for owner in owners:
                try:
                    await self.client.abort(owner, [])
                except LlumletRpcError as e:
                    self._lose(owner, str(e))
                else:
                    for away in self._away.values():
                        if away.owner == owner:
                            away.heard = time.monotonic()

    def _lose(self, owner: str, why: str) -> None:
        lost = [rid for rid, a in self._away.items() if a.owner == owner]
        log.warning("%s stopped answering (%s): %d stream(s) lost", owner, why, len(lost))
        now = self.driver.now()
        for rid in lost:
            self._away.pop(rid).stream._finish(FINISH_LOST, now)

    # ---- the rest of the service ---------------------------------------------------------

    async def abort(self, request: pb.AbortRequests) -> pb.AbortResponse:
        for rid in request.request_ids:
            if not self.driver.abort(rid):
                self.abort_away(rid)
        return pb.AbortResponse(success=True)

    async def push_instance_status(
            self, request: object) -> pb.PushInstanceStatusResponse:
        if self.on_status is None:
            return pb.PushInstanceStatusResponse(success=False, message="no llumlet here")
        status: InstanceStatus = decode_status(request.SerializeToString(),  # type: ignore[attr-defined]
                                               self.instance_id)
        self.on_status(status)
        return pb.PushInstanceStatusResponse(success=True)


def migration_slots(environ: Mapping[str, str]) -> dict[str, int]:
    """Migrate-out and -in slots from upstream's `LLUMNIX_MAX_REQ_MIG_OUT` / `_IN` (1 each).

    Raises:
        ConfigError: a value that is not a positive integer.
    """
    slots = {}
    for key, name in (("max_req_mig_out", "LLUMNIX_MAX_REQ_MIG_OUT"),
                      ("max_req_mig_in", "LLUMNIX_MAX_REQ_MIG_IN")):
        text = environ.get(name, str(DEFAULT_MAX_REQ_MIG))
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"{name}={text!r}: must be an integer >= 1")
        slots[key] = int(text)
    return slots


def _invalid(message: str) -> NoReturn:
    raise LlumletRpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


