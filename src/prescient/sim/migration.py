"""Executing migration plans on simulated engines: the llumlets' and the KV link's part.

The rescheduler plans pairs; this driver does what the source llumlet, the two engines and the
transfer between them do upstream (reference §7.3-7.5), as simulator events:

- the slot pre-check (`selection.refuse`), then the source engine's request selection;
- per chosen request, the stages of `rescheduler.migration`: reserve on the destination, copy
  at the link's bandwidth while the source keeps decoding, then stop, copy the rest and commit.

Every engine operation that changes blocks or the batch runs at that engine's next step boundary
(`MigrationHost.at_boundary`, which cuts a decode run short as an arrival does), so simulating
with or without closed-form decode runs gives the same result. A `MigrationRecord` per request
says what happened, and the downtime is what the request itself lost: from its stop on the
source to its commit on the destination (plus, in its token timings, the wait for the
destination's next step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

from prescient.engine import EngineRequest, SimEngine
from prescient.rescheduler.migration import (
    MigrationSettings,
    Stage,
    copy_time_s,
    final_blocks,
    full_blocks,
    next_stage,
)
from prescient.rescheduler.plan import MigrationPlan
from prescient.rescheduler.selection import refuse


class MigrationRecord(msgspec.Struct, kw_only=True):
    """One request's migration. Times are seconds on the simulated clock."""

    request_id: str
    src: str
    dst: str
    trigger: str  # the rescheduling policy
    start: float  # chosen on the source
    stop: float | None = None  # stopped on the source: the downtime begins
    end: float | None = None  # committed on the destination, or abandoned
    stages: int = 0  # pre-copy stages plus the last one
    blocks: int = 0  # KV blocks copied
    outcome: str = ""  # "migrated", or "aborted: <why>"

    @property
    def downtime(self) -> float | None:
        """Stop to commit, seconds (None unless it migrated)."""
        if self.outcome != "migrated" or self.stop is None or self.end is None:
            return None
        return self.end - self.stop


class MigrationHost(Protocol):
    """What the driver needs from the simulation around it."""

    @property
    def now(self) -> float: ...

    def at_boundary(self, instance_id: str, op: Callable[[], None]) -> None:
        """Run `op` at the engine's next step boundary (at once if it is idle)."""

    def after(self, delay: float, op: Callable[[], None]) -> None:
        """Run `op` `delay` seconds from now."""

    def alive(self, instance_id: str) -> bool: ...

    def lost_in_transit(self, req: EngineRequest) -> None:
        """A stopped request whose copy can no longer complete (an instance failed)."""


class _Migration:
    """One request on its way; its record, the blocks copied and reserved so far."""

    __slots__ = ("copied", "dst", "record", "req", "reserved", "src")

    def __init__(self, record: MigrationRecord, src: SimEngine, dst: SimEngine) -> None:
        self.record = record
        self.src = src
        self.dst = dst
        self.copied = 0  # blocks on the destination
        self.reserved = 0  # blocks reserved there (copied or being copied)
        self.req: EngineRequest | None = None  # once stopped on the source

    @property
    def done(self) -> bool:
        return bool(self.record.outcome)


class Migrator:
    """Runs migration plans; keeps a record per request and counts refused commands."""

    def __init__(self, host: MigrationHost, engines: Mapping[str, SimEngine],
                 kv_bytes_per_token: Mapping[str, int], settings: MigrationSettings) -> None:
        self.host = host
        self.engines = engines
        self.kv_bytes = kv_bytes_per_token
        self.settings = settings
        self.records: list[MigrationRecord] = []
        self.num_refused = 0  # commands the source (or a dead instance) refused
        self._active: dict[str, _Migration] = {}  # by request id
        self._out: dict[str, int] = dict.fromkeys(engines, 0)  # slots in use per instance
        self._in: dict[str, int] = dict.fromkeys(engines, 0)

    def execute(self, plan: MigrationPlan) -> int:
        """Start the plan's migrations; returns how many requests were chosen."""
        host, s = self.host, self.settings
        if not (host.alive(plan.src) and host.alive(plan.dst)):
            self.num_refused += 1  # the Migrate call fails: nothing answers
            return 0
        free_out = s.max_req_mig_out - self._out[plan.src]
        free_in = s.max_req_mig_in - self._in[plan.dst]
        if refuse(plan.rule, plan.value, free_out) or (free_in <= 0 and not plan.drains):
            self.num_refused += 1
            return 0
        src, dst = self.engines[plan.src], self.engines[plan.dst]
        chosen = src.select_migrating_out(plan.rule, plan.order, plan.value,
                                          min(free_out, free_in), host.now)
        for rid in chosen:
            record = MigrationRecord(request_id=rid, src=plan.src, dst=plan.dst,
                                     trigger=plan.trigger, start=host.now)
            self.records.append(record)
            m = self._active[rid] = _Migration(record, src, dst)
            self._out[plan.src] += 1
            self._in[plan.dst] += 1
            self._next_stage(m)
        return len(chosen)

    def on_crash(self, instance_id: str) -> None:
        """An instance died: abandon every migration from or to it."""
        for m in list(self._active.values()):
            src, dst = m.record.src, m.record.dst
            if instance_id not in (src, dst):
                continue
            if m.req is not None:  # stopped: neither side can finish the copy
                self._close(m, "aborted: instance failed")
                self.host.lost_in_transit(m.req)
            else:  # the source keeps it, or it dies with the source
                self._abort(m, "instance failed")

    # ---- stages --------------------------------------------------------------------------

    def _next_stage(self, m: _Migration) -> None:
        if m.done:
            return
        tokens = m.src.migration_kv_tokens(m.record.request_id, self.host.now)
        if tokens is None:
            self._abort(m, "left the source")
            return
        blocks = full_blocks(tokens, m.src.config.block_size) - m.copied
        stage = next_stage(blocks, m.record.stages, self.settings)
        if stage is Stage.ABORT:
            self._abort(m, "did not converge")
            return
        m.record.stages += 1
        if stage is Stage.FINAL:
            self._final(m, waiting=tokens == 0)
            return

        def reserved() -> None:  # at the destination's step boundary
            if self._reserve(m, blocks):
                self._copy(m, blocks, self._next_stage)

        self.host.at_boundary(m.record.dst, reserved)

    def _final(self, m: _Migration, *, waiting: bool) -> None:
        """Reserve the rest, then stop. A waiting request has no KV: it just moves."""
        if waiting:
            self._stop(m)
            return

        def reserved() -> None:  # at the destination's step boundary
            if m.done:
                return
            tokens = m.src.migration_kv_tokens(m.record.request_id, self.host.now)
            if tokens is None:
                self._abort(m, "left the source")
                return
            # the source's step in flight adds at most one token before the stop
            blocks = final_blocks(tokens, m.src.config.block_size) - m.reserved
            if self._reserve(m, max(0, blocks)):
                self._stop(m)

        self.host.at_boundary(m.record.dst, reserved)

    def _reserve(self, m: _Migration, blocks: int) -> bool:
        """Pre-allocate on the destination (between its steps); abort when it has no room."""
        if m.done:
            return False
        if blocks and not m.dst.reserve_migrate_in(m.record.request_id, blocks):
            self._abort(m, "no room on the destination")
            return False
        m.reserved += blocks
        return True

    def _copy(self, m: _Migration, blocks: int, then: Callable[[_Migration], None]) -> None:
        bs = m.src.config.block_size
        delay = copy_time_s(blocks, bs, self.kv_bytes[m.record.src], self.settings)

        def copied() -> None:
            if not m.done:
                m.copied += blocks
                m.record.blocks += blocks
                then(m)

        self.host.after(delay, copied)

    def _stop(self, m: _Migration) -> None:
        """The last stage: stop the request on the source, copy the rest, commit."""
        def stop() -> None:  # at the source's step boundary
            if m.done:
                return
            req = m.src.migrate_out_stop(m.record.request_id)
            if req is None:
                self._abort(m, "left the source")
                return
            m.req = req
            m.record.stop = self.host.now
            rest = math.ceil(req.num_computed / m.src.config.block_size) - m.copied
            self._copy(m, rest, self._commit)

        self.host.at_boundary(m.record.src, stop)

    def _commit(self, m: _Migration) -> None:
        def commit() -> None:  # at the destination's step boundary
            if m.done or m.req is None:
                return
            m.dst.commit_migrate_in(m.req)
            self._close(m, "migrated")

        self.host.at_boundary(m.record.dst, commit)

    # ---- endings -------------------------------------------------------------------------

    def _abort(self, m: _Migration, why: str) -> None:
        """Abandon a migration before its stop: the source keeps the request."""
        if m.done:
            return
        rid = m.record.request_id
        self._close(m, f"aborted: {why}")
        if self.host.alive(m.record.src):
            m.src.cancel_migrate_out(rid)
        if m.reserved and self.host.alive(m.record.dst):
            self.host.at_boundary(m.record.dst, lambda: m.dst.release_migrate_in(rid))

    def _close(self, m: _Migration, outcome: str) -> None:
        m.record.outcome = outcome
        m.record.end = self.host.now
        del self._active[m.record.request_id]
        self._out[m.record.src] -= 1
        self._in[m.record.dst] -= 1
