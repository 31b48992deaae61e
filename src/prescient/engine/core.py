"""The simulated engine: a vLLM-v1-like scheduler as a pure state machine.

One engine step schedules work (decodes first, then running prefills, then waiting requests in
FCFS order, under `max_num_seqs` and a `max_num_batched_tokens` budget with chunked prefill),
allocates paged KV blocks (preempting the most recently admitted request by recompute when they
run out), and after the step's duration emits one token for every request that computed its last
pending token. A driver owns time:

    end = engine.start_step(now)     # plan the next step(s); None when there is nothing to do
    outcome = engine.complete_step() # at `end`: commit, get finished requests
    engine.interrupt(now)            # new input arrived: cut a run of decode steps short
    engine.abort(request_id, now)    # between steps: drop a request (client went away)

Migration (a driver steps through `prescient.rescheduler.migration`'s protocol): the source
selects requests to leave (`select_migrating_out`) and reports their KV size while they keep
decoding (`migration_kv_tokens`); the destination reserves blocks (`reserve_migrate_in`); the
source stops a request (`migrate_out_stop`) and the destination takes it with its KV and output
so far (`commit_migrate_in`), or gives the reservation back (`release_migrate_in`). Everything
that changes blocks or the batch happens between steps, so a driver first cuts a run short with
`interrupt(now, force=True)`, exactly as for an arrival.

Runs of identical decode-only steps are skipped in closed form. A decoding request is not updated
per step: it is anchored at the step `g0` where it started decoding with `out0` tokens, so at
global step `s` it has `out0 + s - g0` tokens, and needs `a + s` KV slots with
`a = prompt_len + out0 - g0`. Engine-wide sums of `a` and counts of `a mod block_size` then give
the KV tokens read by step `s` and the blocks allocated by any span of steps in O(block_size);
a heap of finish steps gives the next completion. A run ends at the first completion, when the
KV blocks would run out, or when `interrupt` is called.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Sequence
from itertools import count, islice

import msgspec

from prescient.cache.hashing import extend_sim_chain
from prescient.engine.config import EngineConfig
from prescient.engine.kv_cache import BlockPool
from prescient.engine.lens import LensStep, lens_target_s
from prescient.engine.request import EngineRequest
from prescient.engine.step_time import StepTimeModel
from prescient.engine.steps import count_starts, run_time
from prescient.model import InstanceStatus, Request
from prescient.rescheduler.plan import SelectOrder, SelectRule
from prescient.rescheduler.selection import Candidate, select

_NO_SAMPLE = (-1, 0, 0.0)


class StepOutcome(msgspec.Struct, frozen=True):
    """What a committed step (or run of decode steps) produced."""

    end_time: float  # seconds
    num_steps: int
    finished: tuple[EngineRequest, ...]


class _Plan(msgspec.Struct):
    """The step or run in flight: `n` steps from `start`, step k taking `alpha + beta * k`."""

    start: float
    n: int
    alpha: float
    beta: float
    chunks: list[tuple[EngineRequest, int]]  # prefill work of a single step
    num_waiting: int  # waiting queue length right after scheduling
    num_seen: int  # requests added before this schedule (seen at its step begin)
    prefill_tokens: int  # prefill tokens scheduled
    sampled_tokens: int  # of which in chunks of more than one token (the profiling sample)

    @property
    def end(self) -> float:
        return self.start + run_time(self.alpha, self.beta, self.n)


class SimEngine:
    """One simulated instance. Pure: time comes in as `now`, nothing is read or written."""

    def __init__(
        self, instance_id: str, config: EngineConfig, model: StepTimeModel,
        *, skip_decode_runs: bool = True,
    ) -> None:
        self.instance_id = instance_id
        self.skip_decode_runs = skip_decode_runs  # False steps one by one (for cross-checks)
        self.config = config
        self.model = model
        self.pool = BlockPool(config.num_gpu_blocks, config.block_size)
        self._bs = config.block_size
        # names token-id prompts' full blocks (e.g. as vLLM does, for a server publishing KV
        # events); None: the simulator's own chain, `_hashes`
        self.token_hasher: Callable[[Sequence[int], int], list[int]] | None = None
        self._watermark_blocks = int(config.watermark * config.num_gpu_blocks)
        self._step = 0  # steps completed
        self._num_updates = 0  # status updates produced
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[str, EngineRequest] = {}  # admission order
        self._live: dict[str, EngineRequest] = {}  # every waiting or running request, by id
        self._prefilling: list[EngineRequest] = []  # running, still computing their tokens
        self._dec_count = 0
        self._dec_a_sum = 0
        self._dec_finish_sum = 0
        self._dec_residue = [0] * config.block_size  # decoding requests by a mod block_size
        self._finish_heap: list[tuple[int, int, int, EngineRequest]] = []
        self._heap_seq = count()
        self._plan: _Plan | None = None
        self._idle_since: float | None = None  # when a step last found nothing to do
        self._num_added = 0
        self._seen: deque[tuple[int, float, str]] = deque()  # (seq, arrival, id), recent only
        self._dec_need = 0  # blocks this step's decodes allocate (valid while scheduling)
        self._sample: tuple[int, int, float] = _NO_SAMPLE  # profiling id, tokens, ms
        self._num_samples = 0
        # migration state, by request id: chosen to leave; blocks reserved for one coming in;
        # arrived with their KV and waiting for a batch slot (they decode from then on)
        self._migrating_out: set[str] = set()
        self._reserved: dict[str, int] = {}
        self._arrived: dict[str, EngineRequest] = {}
        # P/D disaggregation: waiting requests whose prompt KV (all but the last token) came
        # from a prefill instance; they compute only the last token when admitted
        self._external: dict[str, int] = {}

    # ---- public surface -------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A step or run is in flight."""
        return self._plan is not None

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._arrived)

    @property
    def num_steps(self) -> int:
        return self._step

    def add_request(self, request: Request, now: float, *, prefilled: bool = False) -> str:
        """Queue a request. Returns "" or why it was refused (it could never run here).

        `prefilled`: its prompt's KV was computed elsewhere and arrives with it (a decode
        instance under P/D disaggregation): at admission only the last prompt token is computed,
        as vLLM recomputes it for the first token's logits. A preemption loses the KV; the
        request then recomputes its whole prompt, as vLLM does.
        """
        total = request.prompt_len + request.output_len
        if request.request_id in self._live:
            return f"request id {request.request_id!r} is already queued or running"
        if total > self.config.max_model_len:
            return f"prompt + output ({total} tokens) exceed max_model_len"
        if -(-total // self._bs) > self.config.num_gpu_blocks - self._watermark_blocks:
            return f"prompt + output ({total} tokens) exceed the KV cache capacity"
        req = EngineRequest(request, now, self._coverage_blocks(request))
        self._waiting.append(req)
        self._live[request.request_id] = req
        if prefilled and request.prompt_len > 1:
            self._external[request.request_id] = request.prompt_len - 1
        self._seen.append((self._num_added, now, request.request_id))
        self._num_added += 1
        return ""

    def start_step(self, now: float) -> float | None:
        """Schedule the next step (or run of decode steps) at `now`; return its end time."""
        if self._plan is not None:
            raise RuntimeError(f"{self.instance_id}: a step is already in flight")
        if not self.has_work:
            if self._idle_since is None:
                self._idle_since = now
            return None
        self._plan = self._schedule(now)
        if self._plan is None:
            return None  # only blocks reserved for incoming migrations could run; wait for them
        if self._idle_since is not None:  # the engine wakes up first (a single step: new work)
            self._plan.start += self.config.wakeup_s(now - self._idle_since)
            self._idle_since = None
        self._num_updates += 1
        return self._plan.end

    def interrupt(self, now: float, *, force: bool = False) -> float:
        """New input at `now`: end the current run at the first step boundary after `now`.

        `force` always ends it there (a migration must change blocks or the batch between
        steps); otherwise a run whose outcome the input cannot change goes on.
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError(f"{self.instance_id}: nothing in flight to interrupt")
        # A FCFS queue that was already blocked at the schedule (or a full batch) stays
        # blocked until the run ends at a completion, so the run goes on unchanged; a
        # shortest-first queue may put the newcomer in front, so it must be looked at.
        blocked = plan.num_waiting > 0 and self.config.queue_policy == "fcfs"
        admissible = force or (not blocked and len(self._running) < self.config.max_num_seqs)
        if plan.n > 1 and admissible:
            plan.n = max(1, count_starts(plan.alpha, plan.beta, plan.n, now - plan.start, True))
        return plan.end

    def complete_step(self) -> StepOutcome:
        """Commit the step or run in flight at its end time."""
        plan = self._plan
        if plan is None:
            raise RuntimeError(f"{self.instance_id}: no step in flight")
        self._plan = None
        end = plan.end
        self.pool.allocate(self._decode_need(self._step, plan.n))
        self._step += plan.n
        self._num_updates += plan.n - 1
        last_ms = (plan.alpha + plan.beta * (plan.n - 1)) * 1000.0
        self._sample = self._profile(plan.sampled_tokens, last_ms)
        finished: list[EngineRequest] = []
        for req, n in plan.chunks:
            self._advance_prefill(req, n, end, finished)
        self._pop_finished_decodes(end, finished)
        if not self.has_work:
            self._num_updates += 1  # the idle status
        return StepOutcome(end, plan.n, tuple(finished))

    def abort(self, request_id: str, now: float) -> bool:
        """Drop a waiting or running request at `now`, as vLLM does when its client goes away.

        Only between steps: a step in flight has planned work for the request, and cutting it
        out of the plan would make the step's time and KV allocation wrong. A live driver queues
        aborts and applies them after `complete_step`. The request's blocks go back to the pool
        (full blocks stay in the prefix cache, as vLLM's freed blocks do) and its decode anchor
        leaves the aggregates exactly as a preemption would. Returns False for an unknown id.
        """
        self._between_steps("abort")
        req = self._live.pop(request_id, None)
        if req is None:
            return False
        self._migrating_out.discard(request_id)
        if request_id in self._running:
            if req.g0 >= 0:
                self._leave_decode(req, self._step)
            else:
                self._prefilling.remove(req)
            del self._running[request_id]
            self._release(req)
        elif self._arrived.pop(request_id, None) is not None:
            self._release(req)
        else:
            self._waiting.remove(req)
            self._external.pop(request_id, None)
        req.finish_time = now
        if not self.has_work:
            self._num_updates += 1  # the idle status
        return True

    def num_output_tokens(self, request_id: str, now: float | None = None) -> int:
        """Tokens sampled so far by a waiting or running request (KeyError if neither).

        Between steps this is exact; with a step in flight it is the count before that step,
        or, given `now`, the count after the steps of the run in flight that ended by then.
        """
        req = self._live[request_id]
        if req.g0 >= 0:
            done = 0 if now is None else self._steps_done(now)
            return req.num_output + self._step + done - req.g0
        return req.num_output

    def num_cached_tokens(self, request_id: str) -> int:
        """Prompt tokens a live request found in the prefix cache when first scheduled."""
        req = self._live.get(request_id)
        return 0 if req is None else req.num_cached_tokens

    def live_requests(self) -> tuple[EngineRequest, ...]:
        """Every request waiting, running or arrived by migration, in arrival order."""
        return tuple(self._live.values())

    # ---- migration ---------------------------------------------------------------------------

    @property
    def num_migrating_out(self) -> int:
        """Requests chosen to leave and not gone yet (the migrate-out slots in use)."""
        return len(self._migrating_out)

    @property
    def num_migrating_in(self) -> int:
        """Incoming requests holding reserved blocks (the migrate-in slots in use)."""
        return len(self._reserved)

    def reserved_blocks(self, request_id: str) -> int:
        """Blocks reserved here for an incoming request (0: none)."""
        return self._reserved.get(request_id, 0)

    def migration_candidates(self, now: float) -> list[Candidate]:
        """Every waiting or running request as the selection sees it at `now`, in arrival
        order (sequence lengths count the steps of the run in flight that ended by `now`)."""
        out = []
        for rid, req in self._live.items():
            if rid in self._arrived:
                continue
            running = rid in self._running
            out.append(Candidate(rid, req.request.prompt_len + self.num_output_tokens(rid, now),
                                 not running, running and req.g0 >= 0,
                                 rid in self._migrating_out))
        return out

    def select_migrating_out(self, rule: SelectRule, order: SelectOrder, value: float,
                             max_requests: float, now: float) -> list[str]:
        """Choose requests to migrate out at `now` (reference §7.3); mark them as leaving."""
        chosen = select(self.migration_candidates(now), rule, order, value,
                        num_gpu_tokens=self.pool.num_blocks * self._bs, max_requests=max_requests)
        self._migrating_out.update(chosen)
        return chosen

    def cancel_migrate_out(self, request_id: str) -> None:
        """The migration of `request_id` was abandoned: it stays here as if never chosen."""
        self._migrating_out.discard(request_id)

    def migration_kv_tokens(self, request_id: str, now: float) -> int | None:
        """Tokens with KV of a leaving request at `now` (0 while waiting).

        None when it can no longer leave as chosen: finished, aborted, preempted, or (chosen
        while waiting) now prefilling.
        """
        if request_id not in self._migrating_out:
            return None
        req = self._live[request_id]
        if request_id not in self._running:
            return 0
        if req.g0 < 0:
            return None
        return req.a + self._step + self._steps_done(now) - 1

    def migrate_out_stop(self, request_id: str) -> EngineRequest | None:
        """Between steps: take a leaving request off this engine, its blocks freed here.

        Returns the request (its output so far, `num_computed` tokens of KV to carry), or None
        when it can no longer leave (see `migration_kv_tokens`).
        """
        self._between_steps("stop a migration")
        req = self._live.get(request_id)
        running = request_id in self._running
        if request_id not in self._migrating_out or req is None or (running and req.g0 < 0):
            return None
        self._migrating_out.discard(request_id)
        del self._live[request_id]
        if running:
            self._leave_decode(req, self._step)
            del self._running[request_id]
            self._release(req)
        else:
            self._waiting.remove(req)
        if not self.has_work:
            self._num_updates += 1  # the idle status
        return req

    def reserve_migrate_in(self, request_id: str, blocks: int) -> bool:
        """Between steps: pre-allocate `blocks` more for an incoming request; False if no room.

        Room is what a newly admitted request could take: free blocks beyond this step's decode
        growth and the watermark.
        """
        self._between_steps("reserve blocks")
        room = self.pool.num_free - self._decode_need(self._step, 1) - self._watermark_blocks
        if blocks > room:
            return False
        self.pool.allocate(blocks)
        self._reserved[request_id] = self._reserved.get(request_id, 0) + blocks
        return True

    def release_migrate_in(self, request_id: str) -> int:
        """Between steps: give back what was reserved for an abandoned incoming migration."""
        self._between_steps("release reserved blocks")
        blocks = self._reserved.pop(request_id, 0)
        self.pool.release([], blocks)
        return blocks

    def arriving_request(self, request: Request, num_output: int, num_computed: int,
                         now: float) -> EngineRequest:
        """A request migrating in from another process, as `migrate_out_stop` left it there:
        `num_output` tokens sampled, KV for `num_computed` tokens (0: it was waiting). Pass it
        to `commit_migrate_in` once its KV is here."""
        req = EngineRequest(request, now, self._coverage_blocks(request))
        req.num_output = num_output
        req.num_computed = num_computed
        return req

    def commit_migrate_in(self, req: EngineRequest) -> None:
        """Between steps: `req` (from `migrate_out_stop` elsewhere) arrives with its KV.

        A request that was decoding keeps its output and resumes decoding from the next step (no
        recomputation), in the blocks reserved for it; the surplus goes back. One that was
        waiting joins the waiting queue.
        """
        self._between_steps("take a migrated request")
        rid = req.request_id
        if rid in self._live:
            raise ValueError(f"{self.instance_id}: request {rid!r} is already here")
        need = -(-req.num_computed // self._bs)
        reserved = self._reserved.pop(rid, 0)
        if reserved < need:
            self.pool.release([], reserved)
            raise ValueError(f"{self.instance_id}: {rid!r} needs {need} blocks, {reserved} "
                             "reserved")
        self.pool.release([], reserved - need)
        req.num_blocks = need
        self._live[rid] = req
        if need:
            self._register_full_blocks(req)
            self._arrived[rid] = req
        else:
            self._waiting.append(req)

    def _admit_arrived(self, step: int) -> None:
        """Migrated requests join the batch (as decodes) while it has room."""
        arrived = self._arrived
        while arrived and len(self._running) < self.config.max_num_seqs:
            rid = next(iter(arrived))
            req = arrived.pop(rid)
            self._running[rid] = req
            self._enter_decode(req, step)

    def _steps_done(self, now: float) -> int:
        """Steps of the run in flight that have ended by `now`."""
        plan = self._plan
        if plan is None:
            return 0
        elapsed = now - plan.start
        done = count_starts(plan.alpha, plan.beta, plan.n, elapsed, False) - 1
        return max(0, done + (run_time(plan.alpha, plan.beta, plan.n) <= elapsed))

    def _between_steps(self, what: str) -> None:
        if self._plan is not None:
            raise RuntimeError(f"{self.instance_id}: cannot {what} with a step in flight")

    def snapshot(self, now: float, timestamp_ms: int) -> InstanceStatus:
        """The status the engine last produced at or before `now` (after scheduling, or idle)."""
        plan = self._plan
        if plan is None:
            return self._status(self._step, 0, len(self._waiting), self._num_added, 0,
                                self._sample, now, timestamp_ms, self._num_updates)
        j = count_starts(plan.alpha, plan.beta, plan.n, now - plan.start, False)
        j = max(1, j)
        sample = self._sample if j == 1 else _NO_SAMPLE  # decode steps: no prefill sample
        return self._status(self._step + j - 1, self._decode_need(self._step, j),
                            plan.num_waiting, plan.num_seen, plan.prefill_tokens, sample, now,
                            timestamp_ms, self._num_updates + j - 1)

    def outstanding_tokens(self, now: float) -> tuple[int, int]:
        """True remaining work: (prefill tokens to compute, decode tokens to generate)."""
        step = self._step
        plan = self._plan
        if plan is not None and plan.n > 1:
            step += max(1, count_starts(plan.alpha, plan.beta, plan.n, now - plan.start, False)) - 1
        prefill = sum(r.num_tokens - r.num_computed for r in self._prefilling)
        prefill += sum(r.num_tokens for r in self._waiting)
        decode = self._dec_finish_sum - self._dec_count * step
        decode += sum(r.request.output_len - r.num_output for r in self._prefilling)
        decode += sum(r.request.output_len - r.num_output for r in self._waiting)
        decode += sum(r.request.output_len - r.num_output for r in self._arrived.values())
        return prefill, decode

    def _profile(self, prefill_tokens: int, duration_ms: float) -> tuple[int, int, float]:
        """The profiling sample of a finished step (upstream: prefill steps only, N at most)."""
        cfg = self.config
        full = self._num_samples >= cfg.profiling_steps
        if not cfg.enable_profiling or prefill_tokens <= 0 or full:
            return _NO_SAMPLE
        self._num_samples += 1
        return (self._num_samples - 1, prefill_tokens, duration_ms)

    # ---- scheduling ------------------------------------------------------------------------

    def _schedule(self, now: float) -> _Plan | None:
        step = self._step
        self._admit_arrived(step)
        self._dec_need = self._decode_need(step, 1)
        self._make_room(0, step, None)
        budget = self.config.max_num_batched_tokens - self._dec_count
        lens = self._lens_step(step) if self.config.batching == "lens" else None
        chunks: list[tuple[EngineRequest, int]] = []
        budget = self._schedule_running_prefills(step, budget, chunks, lens)
        if self.config.queue_policy == "spf" and len(self._waiting) > 1:
            self._order_waiting()
        self._admit_waiting(now, budget, chunks, lens)
        if chunks:
            return self._single_step_plan(now, step, chunks)
        if not self._dec_count:
            if self._reserved:
                return None
            raise RuntimeError(f"{self.instance_id}: work queued but nothing schedulable")
        return self._decode_run_plan(now, step)

    def _lens_step(self, step: int) -> LensStep:
        """LENS's sizing of this step (engine/lens.py), aimed by the waiting queue's length.

        Skipping decode runs stays exact under LENS: a run is planned only when no prefill
        chunk was scheduled, and LENS always gives a step's first chunk some tokens, so it
        leaves nothing unscheduled that vLLM's budget would have scheduled; a decode-only step
        is the same step whatever the batching.
        """
        cfg = self.config
        target = lens_target_s(len(self._waiting), cfg.lens_min_step_ms,
                               cfg.lens_target_step_ms, cfg.lens_queue_threshold)
        return LensStep(self.model, target, num_decodes=self._dec_count,
                        decode_kv_tokens=self._dec_a_sum + self._dec_count * step,
                        max_chunk=cfg.lens_max_chunk, min_start_tokens=cfg.lens_min_start_tokens)

    def _order_waiting(self) -> None:
        """Shortest predicted output first, with aging; preempted requests stay in front.

        The key `predicted + aging * arrival` orders requests exactly as
        `predicted - aging * waited` would at any moment, so a stable sort at each schedule is
        enough. Without a prediction the key is the arrival alone: FCFS among those.
        """
        aging = self.config.aging_tokens_per_s

        def key(r: EngineRequest) -> tuple[bool, float]:
            predicted = r.request.predicted_output_len or 0
            return (r.num_preemptions == 0, predicted + aging * r.arrival_time)

        self._waiting = deque(sorted(self._waiting, key=key))

    def _make_room(self, blocks: int, step: int, requester: EngineRequest | None) -> bool:
        """Preempt from the tail until `blocks` are free beyond this step's decode needs.

        Returns False when the requester itself had to be preempted.
        """
        while blocks > self.pool.num_free - self._dec_need:
            victim = self._last_running()
            self._preempt(victim, step)
            self._dec_need = self._decode_need(step, 1)
            if victim is requester:
                return False
        return True

    def _schedule_running_prefills(
        self, step: int, budget: int, chunks: list[tuple[EngineRequest, int]],
        lens: LensStep | None,
    ) -> int:
        bs = self._bs
        # admission order, also under LENS (whose paper takes the fewest remaining first):
        # preemption takes the most recently admitted, which must not hold a chunk already
        for req in list(self._prefilling):
            if budget <= 0:
                break
            if req.request_id not in self._running:
                continue  # preempted by an earlier request of this loop
            n = min(req.num_tokens - req.num_computed, budget)
            if lens is not None:
                n = lens.size(req.num_computed, n, starting=False)
                if n <= 0:
                    break
            need = -(-(req.num_computed + n) // bs) - req.num_blocks
            if not self._make_room(need, step, req):
                break
            self.pool.allocate(need)
            req.num_blocks += need
            chunks.append((req, n))
            if lens is not None:
                lens.take(req.num_computed, n)
            budget -= n
        return budget

    def _admit_waiting(
        self, now: float, budget: int, chunks: list[tuple[EngineRequest, int]],
        lens: LensStep | None,
    ) -> None:
        bs, pool, waiting, dec_need = self._bs, self.pool, self._waiting, self._dec_need
        while waiting and budget > 0 and len(self._running) < self.config.max_num_seqs:
            req = waiting[0]
            hit, hit_free = self._prefix_hit(req)
            # KV present: cached blocks, or (P/D) the prompt transferred from a prefill instance
            present = max(hit * bs, self._external.get(req.request_id, 0))
            n = min(req.num_tokens - present, budget)
            if lens is not None:
                n = lens.size(present, n, starting=True)
                if n <= 0:
                    break
            need = -(-(present + n) // bs) - hit
            if need + hit_free > pool.num_free - dec_need - self._watermark_blocks:
                break
            waiting.popleft()
            self._external.pop(req.request_id, None)
            pool.acquire(req.hashes[:hit])
            pool.allocate(need)
            req.owned = list(req.hashes[:hit])
            req.num_blocks = hit + need
            req.num_computed = present
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
                req.num_cached_tokens = hit * bs
            self._running[req.request_id] = req
            self._prefilling.append(req)
            chunks.append((req, n))
            if lens is not None:
                lens.take(present, n)
            budget -= n

    def _single_step_plan(
        self, now: float, step: int, chunks: list[tuple[EngineRequest, int]]
    ) -> _Plan:
        tokens = sum(n for _, n in chunks)
        pairs = sum(n * (r.num_computed + n / 2) for r, n in chunks)
        kv = self._dec_a_sum + self._dec_count * step
        duration = self.model.step_time(tokens, pairs, self._dec_count, kv)
        if duration <= 0:
            raise ValueError(f"{self.instance_id}: step-time model returned {duration}")
        sampled = sum(n for _, n in chunks if n > 1)
        return _Plan(now, 1, duration, 0.0, chunks, len(self._waiting), self._num_added, tokens,
                     sampled)

    def _decode_run_plan(self, now: float, step: int) -> _Plan:
        heap = self._finish_heap
        while heap[0][2] != heap[0][3].epoch:
            heapq.heappop(heap)
        n = min(heap[0][0] - step, self._max_run_by_blocks(step, self.pool.num_free))
        if not self.skip_decode_runs:
            n = 1
        count_, kv = self._dec_count, self._dec_a_sum + self._dec_count * step
        alpha = self.model.step_time(0, 0.0, count_, kv)
        beta = self.model.step_time(0, 0.0, count_, kv + count_) - alpha
        if alpha <= 0 or beta < 0:
            raise ValueError(f"{self.instance_id}: step-time model is not increasing in KV reads")
        return _Plan(now, max(1, n), alpha, beta, [], len(self._waiting), self._num_added, 0, 0)

    # ---- commit ------------------------------------------------------------------------------

    def _advance_prefill(
        self, req: EngineRequest, n: int, end: float, finished: list[EngineRequest]
    ) -> None:
        req.num_computed += n
        self._register_full_blocks(req)
        if req.num_computed < req.num_tokens:
            return
        req.num_output += 1
        if req.first_token_time is None:
            req.first_token_time = end
        self._prefilling.remove(req)
        if req.num_output >= req.request.output_len:
            self._finish(req, end, finished)
        else:
            self._enter_decode(req, self._step)

    def _pop_finished_decodes(self, end: float, finished: list[EngineRequest]) -> None:
        heap = self._finish_heap
        while heap and heap[0][0] <= self._step:
            _, _, epoch, req = heapq.heappop(heap)
            if epoch != req.epoch:
                continue
            self._leave_decode(req, self._step)
            self._finish(req, end, finished)

    def _finish(self, req: EngineRequest, end: float, finished: list[EngineRequest]) -> None:
        self._migrating_out.discard(req.request_id)
        del self._running[req.request_id]
        del self._live[req.request_id]
        self._release(req)
        req.finish_time = end
        finished.append(req)

    # ---- decode anchoring -----------------------------------------------------------------

    def _enter_decode(self, req: EngineRequest, step: int) -> None:
        req.g0 = step
        req.a = req.num_tokens - step
        req.finish_step = step + req.request.output_len - req.num_output
        req.epoch += 1
        self._dec_count += 1
        self._dec_a_sum += req.a
        self._dec_finish_sum += req.finish_step
        self._dec_residue[req.a % self._bs] += 1
        heapq.heappush(self._finish_heap, (req.finish_step, next(self._heap_seq), req.epoch, req))

    def _leave_decode(self, req: EngineRequest, step: int) -> None:
        """Materialise a decoding request's counters as of `step` (between steps)."""
        req.num_output += step - req.g0
        req.num_computed = req.num_tokens - 1
        req.num_blocks = -(-req.num_computed // self._bs)
        self._dec_count -= 1
        self._dec_a_sum -= req.a
        self._dec_finish_sum -= req.finish_step
        self._dec_residue[req.a % self._bs] -= 1
        req.g0 = -1
        req.epoch += 1
        self._register_full_blocks(req)

    def _decode_need(self, step: int, n: int) -> int:
        """Blocks the decoding requests allocate over steps `step .. step + n - 1`.

        A request needs a new block at step s exactly when `a + s - 1` is a multiple of the
        block size; any `block_size` consecutive steps need one block per request.
        """
        if not self._dec_count:
            return 0
        bs, residue = self._bs, self._dec_residue
        full, rest = divmod(n, bs)
        need = full * self._dec_count
        for j in range(rest):
            need += residue[(1 - step - j) % bs]
        return need

    def _max_run_by_blocks(self, step: int, free: int) -> int:
        """The longest decode run whose block allocations fit in `free` blocks."""
        bs, residue = self._bs, self._dec_residue
        cycles = free // self._dec_count
        n, used = cycles * bs, cycles * self._dec_count
        for _ in range(bs):
            need = residue[(1 - step - n) % bs]
            if used + need > free:
                break
            used += need
            n += 1
        return n

    # ---- blocks and preemption --------------------------------------------------------------

    def _last_running(self) -> EngineRequest:
        return self._running[next(reversed(self._running))]

    def _preempt(self, req: EngineRequest, step: int) -> None:
        """Preempt by recompute: free everything, requeue at the front of the waiting queue."""
        self._migrating_out.discard(req.request_id)  # a migration of it aborts
        if req.g0 >= 0:
            self._leave_decode(req, step)
        else:
            self._prefilling.remove(req)
        del self._running[req.request_id]
        self._release(req)
        req.num_computed = 0
        req.num_preemptions += 1
        self._waiting.appendleft(req)

    def _release(self, req: EngineRequest) -> None:
        held = [h for h in req.owned if h is not None]
        self.pool.release(held, req.num_blocks - len(held))
        req.owned = []
        req.num_blocks = 0

    def _register_full_blocks(self, req: EngineRequest) -> None:
        full = min(req.num_computed // self._bs, req.coverage_blocks)
        if full <= len(req.owned):
            return
        hashes = self._hashes(req, full)
        for b in range(len(req.owned), full):
            h = hashes[b]
            req.owned.append(h if self.pool.register(h) else None)

    # ---- prefix hashing ------------------------------------------------------------------

    def _prefix_hit(self, req: EngineRequest) -> tuple[int, int]:
        """Cached leading blocks of a waiting request, and how many of those are free.

        At least the last token is always computed, as in vLLM.
        """
        max_hit = min(req.coverage_blocks, (req.num_tokens - 1) // self._bs)
        if max_hit <= 0:
            return 0, 0
        return self.pool.hit_blocks(self._hashes(req, max_hit)[:max_hit])

    def _coverage_blocks(self, request: Request) -> int:
        """Leading blocks of the request whose content another request could share."""
        if not self.config.enable_prefix_caching:
            return 0
        if request.prompt_token_ids is not None:
            tokens = request.prompt_len
        else:
            tokens = len(request.prefix_block_ids) * request.prefix_block_size
        return min(tokens, request.prompt_len + request.output_len) // self._bs

    def _hashes(self, req: EngineRequest, upto: int) -> list[int]:
        """Chain hashes of the request's first `upto` blocks (cached on the request)."""
        hashes = req.hashes
        if len(hashes) >= upto:
            return hashes
        bs, request = self._bs, req.request
        if request.prompt_token_ids is not None and self.token_hasher is not None:
            hashes[:] = self.token_hasher(request.prompt_token_ids, bs)  # every full block
            return hashes
        return extend_sim_chain(request, bs, hashes, upto)

    # ---- status ----------------------------------------------------------------------------

    def _recent_waiting(self, num_seen: int, now: float) -> tuple[str, ...]:
        """Ids seen in the waiting queue at a step begin that arrived in the recent window.

        Every request waits at least until the next step begins, so this is every request
        added before the last schedule and less than `recent_waiting_s` old (upstream's
        `recent_waiting_requests`, which the local account reconciles against).
        """
        seen, horizon = self._seen, now - self.config.recent_waiting_s
        while seen and seen[0][1] < horizon:
            seen.popleft()
        return tuple(rid for seq, _, rid in seen if seq < num_seen)

    def _status(
        self, step: int, dec_need: int, num_waiting: int, num_seen: int, scheduled_prefill: int,
        sample: tuple[int, int, float], now: float, timestamp_ms: int, update_id: int,
    ) -> InstanceStatus:
        bs = self._bs
        waiting = list(islice(self._waiting, num_waiting))
        waiting_tokens = sum(r.num_tokens for r in waiting)
        waiting_uncomputed = waiting_tokens - sum(
            max(bs * self._prefix_hit(r)[0] if r.coverage_blocks else 0,
                self._external.get(r.request_id, 0)) for r in waiting)
        to_decode = [r for r in waiting if r.request.output_len > 1]
        prefill_left = sum(r.num_tokens - r.num_computed for r in self._prefilling)
        pf_to_decode = [r for r in self._prefilling if r.request.output_len > 1]
        dec_tokens = self._dec_a_sum + self._dec_count * step
        dec_tokens += sum(r.num_tokens for r in pf_to_decode)
        recent = self._recent_waiting(num_seen, now)
        used_blocks = self.pool.num_blocks - (self.pool.num_free - dec_need)
        arrived = self._arrived.values()
        loading_tokens = sum(r.num_tokens for r in arrived) + bs * sum(self._reserved.values())
        return InstanceStatus(
            instance_id=self.instance_id,
            timestamp_ms=timestamp_ms,
            step_id=step,
            update_id=update_id,
            recent_waiting_requests=recent,
            waiting_requests=tuple(r.request_id for r in waiting),
            scheduler_waiting_to_decode_requests_num=len(to_decode),
            num_waiting_requests=len(waiting),
            scheduler_running_to_decode_requests_num=self._dec_count + len(pf_to_decode),
            num_running_requests=len(self._running),
            num_loading_requests=len(self._arrived) + len(self._reserved),
            num_tokens_loading_requests=loading_tokens,
            num_total_gpu_tokens=self.pool.num_blocks * bs,
            num_used_gpu_tokens=used_blocks * bs,
            num_uncomputed_tokens_scheduler_waiting_prefills=waiting_uncomputed,
            scheduler_waiting_to_decode_tokens_num=sum(r.num_tokens for r in to_decode),
            num_uncomputed_tokens_scheduler_running_prefills=prefill_left,
            num_unallocated_tokens_scheduler_running_prefills=prefill_left - scheduled_prefill,
            scheduler_running_to_decode_tokens_num=dec_tokens,
            num_uncomputed_tokens_all_waiting_prefills=waiting_uncomputed,
            profiling_id=sample[0],
            num_scheduled_prefill_tokens=sample[1],
            step_duration=sample[2],
        )
