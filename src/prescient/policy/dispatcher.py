"""The dispatcher: the scheduling core one scheduler process runs.

It owns the scheduler's picture of the cluster (the CMS view and its columns), the dispatch-time
local account (full mode) or the router-local counts (lite mode), and one pipeline per infer
type. The live service and the simulator drive it the same way:

    dispatcher.on_instances(metadata, now)   # instance set changed (CMS metadata poll)
    dispatcher.on_statuses(statuses, now)    # CMS status poll
    decision = dispatcher.schedule(request, now, mode)
    dispatcher.release(request_id, now)      # finished or failed

Scheduling modes: `neutral` places one neutral leg; `pd_batch` places a prefill leg then a
decode leg (undoing the prefill's account when no decode instance is available); `pd_staged`
places the one leg the caller names. An empty decision means no instance is available.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping, Sequence

import numpy as np

from prescient.cms.view import CmsView
from prescient.model import (
    Decision,
    InferType,
    InstanceMetadata,
    InstanceStatus,
    Placement,
    Request,
)
from prescient.policy.account import LocalAccount
from prescient.policy.framework import Feature, Pipeline, PlacementObserver, SchedulingContext
from prescient.policy.lite import LiteState
from prescient.policy.state import INFER_CODES, ClusterState


class SchedulingMode(enum.StrEnum):
    NEUTRAL = "neutral"
    PD_BATCH = "pd_batch"
    PD_STAGED = "pd_staged"


_LEGS = {SchedulingMode.NEUTRAL: (InferType.NEUTRAL,),
         SchedulingMode.PD_BATCH: (InferType.PREFILL, InferType.DECODE)}


class Dispatcher:
    """Cluster view + accounts + pipelines. Pure: time comes in as `now`.

    Args:
        name: the policy name, for reports.
        pipelines: one per infer type the policy schedules.
        rng: the seeded source of every random choice.
        full_mode: candidates need a CMS status (full mode) or only to be known (lite mode).
        local_account: the full-mode local account, or None to go without.
        needs_cms: scheduling fails while the CMS is unavailable (full-mode policies).
        features: fill per-request context columns (predictions, prefix hits) before picking.
        observers: told of every placement (e.g. a router-history prefix index learns from it).
    """

    def __init__(
        self,
        name: str,
        pipelines: Mapping[InferType, Pipeline],
        rng: random.Random,
        *,
        full_mode: bool,
        local_account: LocalAccount | None = None,
        needs_cms: bool = False,
        features: Sequence[Feature] = (),
        observers: Sequence[PlacementObserver] = (),
    ) -> None:
        self.name = name
        self.pipelines = dict(pipelines)
        self.rng = rng
        self.full_mode = full_mode
        self.account = local_account
        self.lite = None if full_mode else LiteState()
        self.needs_cms = needs_cms
        self.features = tuple(features)
        self.observers = tuple(observers)
        self.cms = CmsView()
        self.state = ClusterState()
        self._predicted: dict[str, list[tuple[str, int]]] = {}  # request -> (instance, tokens)
        # None: statuses come through the CMS (llumlet push + poll); a number: the policy
        # scrapes each engine's metrics itself this often, as peer routers do
        self.scrape_interval_s: float | None = None
        # adaptive PD: every instance is a candidate for every leg, whatever its infer type
        self.any_instance_any_leg = False
        # candidate masks per infer type, for one state version (metadata and statuses)
        self._candidates: dict[tuple[InferType, bool], np.ndarray] = {}
        self._candidates_version = -1

    # ---- the cluster view ------------------------------------------------------------------

    def on_instances(self, metadata: Mapping[str, InstanceMetadata], now: float) -> None:
        """Replace the instance set (a CMS metadata poll, or service discovery)."""
        added, removed = self.cms.apply_metadata(metadata, now)
        current = [self.cms.metadata(i) for i in self.cms.instance_ids()]
        if not added and not removed and current == self.state.metadata:
            return
        for iid in removed:
            if self.account is not None:
                self.account.drop_instance(iid)
            if self.lite is not None:
                self.lite.remove_instance(iid)
        if self.lite is not None:
            for iid in added:
                self.lite.add_instance(iid)
        self.state.set_instances(current)
        for row, iid in enumerate(self.state.ids):
            self.state.set_status(row, self.cms.status(iid))
            self._refresh_row(iid)

    def on_statuses(self, statuses: Mapping[str, InstanceStatus | None], now: float) -> None:
        """Apply one CMS status poll and reconcile the local account against it."""
        replaced = set(self.cms.apply_statuses(statuses, now))
        for iid in statuses:
            row = self.state.row(iid)
            if row is None:
                continue
            status = self.cms.status(iid)
            self.state.set_status(row, status)
            if status is None and self.account is not None:
                self.account.drop_instance(iid)  # its status key vanished: start afresh
                self.state.set_account(row, self.account.counts(iid))
            if iid in replaced and self.account is not None and status is not None:
                self.account.reconcile(iid, status.recent_waiting_requests,
                                       status.waiting_requests, now)
                self.state.set_account(row, self.account.counts(iid))
        samples = self.cms.take_profiling_samples()
        for feature in self.features:
            feature.on_statuses(self.state, samples, now)

    def report(self, request_id: str, instance_id: str, num_tokens: int) -> None:
        """Lite mode: the gateway saw the request grow to `num_tokens` (upstream `/report`)."""
        if self.lite is not None and self.lite.update(request_id, instance_id, num_tokens):
            self._refresh_row(instance_id)

    def mark_cms_unavailable(self, reason: str) -> None:
        self.cms.mark_unavailable(reason)

    def mark_cms_available(self) -> None:
        self.cms.mark_available()

    # ---- decisions -------------------------------------------------------------------------

    def schedule(
        self, request: Request, now: float, mode: SchedulingMode = SchedulingMode.NEUTRAL,
        stage: InferType | None = None,
    ) -> Decision:
        """Place the request's legs; an empty decision means no instance is available."""
        if self.needs_cms:
            self.cms.require_available()
        placements: list[Placement] = []
        for infer_type in _LEGS.get(mode) or self._legs(mode, stage):
            picked = self._pick(request, infer_type, now)
            if picked is None:
                self._undo(request.request_id, placements)
                return Decision(request.request_id)
            row, hit_tokens = picked
            placement = Placement(self.state.ids[row], infer_type)
            placements.append(placement)
            self._count(request, placement, hit_tokens, now)
        if self.observers:
            for placement in placements:
                for observer in self.observers:
                    observer.on_placed(request, placement.instance_id, self.state, now)
        return Decision(request.request_id, tuple(placements))

    def release(self, request_id: str, now: float) -> None:
        """Forget a finished (or failed) request everywhere it was counted."""
        touched: list[str] = []
        if self.account is not None:
            touched += self.account.release(request_id)
        if self.lite is not None:
            touched += self.lite.release(request_id)
        for iid, tokens in self._predicted.pop(request_id, ()):
            self._add_predicted(iid, -tokens)
        for iid in touched:
            self._refresh_row(iid)

    @staticmethod
    def _legs(mode: SchedulingMode, stage: InferType | None) -> Sequence[InferType]:
        """The legs of a `pd_staged` request (the other modes' are in `_LEGS`)."""
        if stage not in (InferType.PREFILL, InferType.DECODE):
            raise ValueError("pd_staged scheduling needs stage=prefill or stage=decode")
        return (stage,)

    def _pick(self, request: Request, infer_type: InferType, now: float
              ) -> tuple[int, int] | None:
        """The chosen row and the prompt tokens it already caches, or None."""
        pipeline = self.pipelines.get(infer_type)
        if pipeline is None or not self.state.ids:
            return None
        candidates = self._candidate_mask(infer_type)
        ctx = SchedulingContext(request, self.state, now, self.rng)
        for feature in self.features:
            feature.prepare(ctx)
        row = pipeline.pick(ctx, candidates)
        if row is None:
            return None
        hits = ctx.prefix_hit_tokens
        return row, 0 if hits is None else int(hits[row])

    def _candidate_mask(self, infer_type: InferType) -> np.ndarray:
        """The rows that may take a leg of `infer_type` (read-only; kept per state version)."""
        if self._candidates_version != self.state.version:
            self._candidates.clear()
            self._candidates_version = self.state.version
        key = (infer_type, self.any_instance_any_leg)
        candidates = self._candidates.get(key)
        if candidates is None:
            if self.any_instance_any_leg:
                candidates = np.ones(len(self.state), bool)
            else:
                candidates = self.state.infer_type == INFER_CODES[infer_type]
            if self.full_mode:
                candidates &= self.state.has_status
            candidates.flags.writeable = False
            self._candidates[key] = candidates
        return candidates

    def _count(self, request: Request, placement: Placement, hit_tokens: int, now: float
               ) -> None:
        iid, rid = placement.instance_id, request.request_id
        if self.account is not None:  # the instance computes only what it does not cache
            self.account.add(rid, iid, placement.infer_type, request.prompt_len,
                             max(0, request.prompt_len - hit_tokens), now)
        if self.lite is not None:
            self.lite.allocate(rid, iid, request.prompt_len)
        if request.predicted_output_len and placement.infer_type is not InferType.PREFILL:
            self._predicted.setdefault(rid, []).append((iid, request.predicted_output_len))
            self._add_predicted(iid, request.predicted_output_len)
        self._refresh_row(iid)

    def _add_predicted(self, instance_id: str, tokens: int) -> None:
        row = self.state.row(instance_id)
        if row is not None:
            self.state.predicted_output[row] += tokens

    def _undo(self, request_id: str, placements: Sequence[Placement]) -> None:
        for placement in placements:
            if self.account is not None:
                self.account.revert_prefill(request_id, placement.instance_id)
            if self.lite is not None:
                self.lite.release(request_id)
            self._refresh_row(placement.instance_id)
        for iid, tokens in self._predicted.pop(request_id, ()):
            self._add_predicted(iid, -tokens)

    def _refresh_row(self, instance_id: str) -> None:
        """Rewrite the instance's dispatch counts (its status row changes only on polls)."""
        row = self.state.index.get(instance_id)
        if row is None:
            return
        if self.account is not None:
            self.state.set_account(row, self.account.counts(instance_id))
        if self.lite is not None:
            self.state.set_lite(row, self.lite.num_requests(instance_id),
                                self.lite.num_tokens(instance_id))
