"""The scheduler's picture of the CMS, with upstream's reader semantics (`cms_read_client.go`).

The CMS holds two keys per instance: metadata (a heartbeat, polled every few seconds) and
status (pushed by the llumlet, polled every tens of milliseconds). A poller reads them and
hands the records to `CmsView`, which decides what wins:

- metadata replaces the instance set; an instance whose metadata vanished loses its status;
- a status whose key vanished (`None`) is deleted;
- a status no newer than the cached one (`timestamp_ms`) is skipped;
- a newer timestamp with the same `update_id` is a keepalive: only `timestamp_ms` and
  `schedulable` are copied (the llumlet re-sends the last engine status, possibly marked
  unschedulable when the engine stopped answering);
- otherwise the status is replaced, and the caller reconciles the local account for it. That
  includes a newer timestamp with a *lower* `update_id`: the engine or its llumlet restarted and
  counts from 1 again (upstream treats it as a keepalive, so a restarted instance's load stays
  frozen at its old figures until the new counter overtakes the old one); the profiling
  high-water mark restarts with it.

A replaced status of a prefill instance that carries a new profiling sample (`profiling_id`
above the last seen one) yields a `ProfilingSample` for the TTFT predictor, drained with
`take_profiling_samples()`.

The view never reads the clock or the network; `now` (seconds) is accepted for symmetry with
the rest of the core and for future staleness rules.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from prescient.errors import PrescientError
from prescient.model import InferType, InstanceMetadata, InstanceStatus

MIN_STEP_DURATION_MS = 1e-3  # upstream predictor rejects samples outside this range
MAX_STEP_DURATION_MS = 1e6


class CmsUnavailableError(PrescientError):
    """The CMS cannot be read; the gateway falls back to round-robin dispatch."""


class ProfilingSample(msgspec.Struct, frozen=True):
    """One engine step of a prefill instance: how long its prefill tokens took."""

    instance_id: str
    num_scheduled_prefill_tokens: int  # tokens
    step_duration_ms: float  # milliseconds


class CmsView:
    """Instance metadata and the newest accepted status of each instance."""

    def __init__(self) -> None:
        self._metadata: dict[str, InstanceMetadata] = {}
        self._statuses: dict[str, InstanceStatus] = {}
        self._profiling_ids: dict[str, int] = {}  # highest profiling_id seen per instance
        self._samples: list[ProfilingSample] = []
        self._ids: tuple[str, ...] = ()
        self._unavailable_reason: str | None = None

    @property
    def available(self) -> bool:
        """False after a failed poll, until the next successful one."""
        return self._unavailable_reason is None

    def mark_unavailable(self, reason: str) -> None:
        """Record that the CMS could not be read (e.g. a Redis error)."""
        self._unavailable_reason = reason

    def mark_available(self) -> None:
        """Record a successful poll."""
        self._unavailable_reason = None

    def require_available(self) -> None:
        """Raise `CmsUnavailableError` with the last failure's reason if the CMS is down."""
        if self._unavailable_reason is not None:
            raise CmsUnavailableError(self._unavailable_reason)

    def apply_metadata(self, records: Mapping[str, InstanceMetadata],
                       now: float) -> tuple[list[str], list[str]]:
        """Replace the instance set with `records` (keyed by instance id).

        Returns:
            (added ids, removed ids), each sorted. Removed ids lose their status too.
        """
        removed = sorted(set(self._metadata) - set(records))
        added = sorted(set(records) - set(self._metadata))
        for instance_id in removed:
            self._forget_status(instance_id)
        self._metadata = dict(records)
        self._ids = tuple(sorted(records))
        return added, removed

    def apply_statuses(self, records: Mapping[str, InstanceStatus | None],
                       now: float) -> list[str]:
        """Merge one poll's statuses; ids without metadata are ignored.

        Returns:
            the sorted ids whose status was fully replaced; the caller reconciles the local
            account of each against its `recent_waiting_requests`/`waiting_requests`.
        """
        replaced: list[str] = []
        for instance_id in sorted(records):
            metadata = self._metadata.get(instance_id)
            if metadata is None:
                continue
            status = records[instance_id]
            if status is None:
                self._forget_status(instance_id)
            elif self._merge(instance_id, status):
                replaced.append(instance_id)
                self._record_profiling(instance_id, metadata.instance_type, status)
        return replaced

    def _merge(self, instance_id: str, status: InstanceStatus) -> bool:
        """Apply one status by upstream's rules; True when it replaced the cached one."""
        cached = self._statuses.get(instance_id)
        if cached is not None and status.timestamp_ms <= cached.timestamp_ms:
            return False
        if cached is not None and status.update_id == cached.update_id:
            self._statuses[instance_id] = msgspec.structs.replace(
                cached, timestamp_ms=status.timestamp_ms, schedulable=status.schedulable)
            return False
        if cached is not None and status.update_id < cached.update_id:
            self._profiling_ids.pop(instance_id, None)  # a restart: its sample ids restart too
        self._statuses[instance_id] = msgspec.structs.replace(status)  # a copy we own
        return True

    def _record_profiling(self, instance_id: str, instance_type: InferType,
                          status: InstanceStatus) -> None:
        """Keep a predictor sample from a replaced status if it is new, from a prefill-capable
        instance and sane.

        Prefill and neutral instances both compute prefills; upstream keeps prefill instances'
        samples only, so without PD disaggregation its predictor never learned anything.

        `profiling_id` -1 (any negative, here) means "no sample". The id advances the
        high-water mark for every instance type, even when the sample itself is rejected, so a
        re-sent sample is never counted twice; the mark resets when the status key vanishes
        (an engine restart counts from 0 again). Upstream also rejects zero scheduled tokens;
        the step duration must lie in [MIN_STEP_DURATION_MS, MAX_STEP_DURATION_MS].
        """
        last = self._profiling_ids.get(instance_id)
        if status.profiling_id < 0 or (last is not None and status.profiling_id <= last):
            return
        self._profiling_ids[instance_id] = status.profiling_id
        if instance_type == InferType.DECODE:
            return
        duration = status.step_duration
        if status.num_scheduled_prefill_tokens <= 0 or not (
                MIN_STEP_DURATION_MS <= duration <= MAX_STEP_DURATION_MS):
            return
        self._samples.append(ProfilingSample(
            instance_id, status.num_scheduled_prefill_tokens, duration))

    def _forget_status(self, instance_id: str) -> None:
        self._statuses.pop(instance_id, None)
        self._profiling_ids.pop(instance_id, None)

    def take_profiling_samples(self) -> list[ProfilingSample]:
        """Drain the predictor samples collected since the last call, in arrival order."""
        samples, self._samples = self._samples, []
        return samples

    def metadata(self, instance_id: str) -> InstanceMetadata | None:
        return self._metadata.get(instance_id)

    def status(self, instance_id: str) -> InstanceStatus | None:
        """The newest accepted status, or None before the first one (or after its key vanished)."""
        return self._statuses.get(instance_id)

    def instance_ids(self) -> list[str]:
        """Ids with metadata, sorted."""
        return list(self._ids)

    def by_infer_type(self, infer_type: InferType) -> list[str]:
        """Sorted ids whose metadata `instance_type` is `infer_type` (status or not)."""
        return [i for i in self._ids if self._metadata[i].instance_type == infer_type]
