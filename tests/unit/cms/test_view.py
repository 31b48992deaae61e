"""CmsView: upstream's reader semantics for metadata and status snapshots."""

from __future__ import annotations

import pytest

from prescient.cms import CmsUnavailableError, CmsView
from prescient.cms.view import ProfilingSample
from prescient.errors import PrescientError
from prescient.model import InferType, InstanceMetadata, InstanceStatus


def meta(iid: str, infer_type: InferType = InferType.NEUTRAL) -> InstanceMetadata:
    return InstanceMetadata(instance_id=iid, instance_type=infer_type)


def status(iid: str, ts: int, update_id: int, **fields: object) -> InstanceStatus:
    return InstanceStatus(instance_id=iid, timestamp_ms=ts, update_id=update_id, **fields)


def view_with(*instances: InstanceMetadata) -> CmsView:
    view = CmsView()
    view.apply_metadata({m.instance_id: m for m in instances}, now=0.0)
    return view


def test_apply_metadata_reports_added_and_removed_sorted() -> None:
    view = CmsView()
    assert view.apply_metadata({"b": meta("b"), "a": meta("a")}, now=0.0) == (["a", "b"], [])
    assert view.apply_metadata({"c": meta("c"), "a": meta("a")}, now=1.0) == (["c"], ["b"])
    assert view.instance_ids() == ["a", "c"]
    assert view.metadata("b") is None
    assert view.metadata("a") == meta("a")


def test_vanished_metadata_drops_the_status() -> None:
    view = view_with(meta("a"), meta("b"))
    view.apply_statuses({"a": status("a", 10, 1), "b": status("b", 10, 1)}, now=0.0)
    view.apply_metadata({"b": meta("b")}, now=1.0)
    assert view.status("a") is None
    view.apply_metadata({"a": meta("a"), "b": meta("b")}, now=2.0)
    assert view.status("a") is None
    assert view.apply_statuses({"a": status("a", 5, 0)}, now=2.0) == ["a"]  # fresh start


def test_full_replace_returns_the_ids_sorted() -> None:
    view = view_with(meta("a"), meta("b"))
    got = view.apply_statuses({"b": status("b", 10, 1), "a": status("a", 10, 1)}, now=0.0)
    assert got == ["a", "b"]
    new = status("a", 20, 2, num_waiting_requests=7)
    assert view.apply_statuses({"a": new, "b": None}, now=0.1) == ["a"]
    assert view.status("a") == new
    assert view.status("a") is not new  # the view owns a copy


def test_statuses_of_unknown_instances_are_ignored() -> None:
    view = view_with(meta("a"))
    assert view.apply_statuses({"ghost": status("ghost", 10, 1)}, now=0.0) == []
    assert view.status("ghost") is None


def test_not_newer_timestamp_is_skipped() -> None:
    view = view_with(meta("a"))
    view.apply_statuses({"a": status("a", 10, 1, num_running_requests=3)}, now=0.0)
    stale = status("a", 10, 5, num_running_requests=99, schedulable=False)
    assert view.apply_statuses({"a": stale}, now=0.1) == []
    cached = view.status("a")
    assert cached is not None
    assert (cached.num_running_requests, cached.schedulable, cached.update_id) == (3, True, 1)


def test_same_update_id_copies_only_timestamp_and_schedulable() -> None:
    view = view_with(meta("a"))
    view.apply_statuses({"a": status("a", 10, 4, num_running_requests=3)}, now=0.0)
    keepalive = status("a", 20, 4, num_running_requests=0, schedulable=False)
    assert view.apply_statuses({"a": keepalive}, now=0.1) == []
    cached = view.status("a")
    assert cached is not None
    assert (cached.timestamp_ms, cached.schedulable) == (20, False)
    assert (cached.num_running_requests, cached.update_id) == (3, 4)
    assert keepalive.num_running_requests == 0  # the caller's object is untouched


def test_a_lower_update_id_with_a_newer_timestamp_is_a_restart_and_replaces() -> None:
    view = view_with(meta("p", InferType.PREFILL))
    view.apply_statuses({"p": status("p", 10, 900, num_running_requests=7, profiling_id=40,
                                     num_scheduled_prefill_tokens=512, step_duration=30.0)},
                        now=0.0)
    assert len(view.take_profiling_samples()) == 1
    restarted = status("p", 20, 1, num_running_requests=0, profiling_id=0,
                       num_scheduled_prefill_tokens=256, step_duration=20.0)
    assert view.apply_statuses({"p": restarted}, now=0.1) == ["p"]
    cached = view.status("p")
    assert cached is not None and (cached.num_running_requests, cached.update_id) == (0, 1)
    assert [s.num_scheduled_prefill_tokens for s in view.take_profiling_samples()] == [256]


def test_none_status_deletes_the_cached_one() -> None:
    view = view_with(meta("a"))
    view.apply_statuses({"a": status("a", 10, 1)}, now=0.0)
    assert view.apply_statuses({"a": None}, now=0.1) == []
    assert view.status("a") is None
    assert view.instance_ids() == ["a"]  # the metadata stays


def prefill_step(ts: int, profiling_id: int, tokens: int = 512,
                 duration_ms: float = 35.0) -> InstanceStatus:
    return status("p", ts, ts, profiling_id=profiling_id, num_scheduled_prefill_tokens=tokens,
                  step_duration=duration_ms)


def test_profiling_samples_come_from_prefill_instances_with_new_ids() -> None:
    view = view_with(meta("p", InferType.PREFILL), meta("d", InferType.DECODE))
    view.apply_statuses({"p": prefill_step(1, -1)}, now=0.0)
    view.apply_statuses({"p": prefill_step(2, 0, 256, 20.0)}, now=0.1)
    view.apply_statuses({"p": prefill_step(3, 0)}, now=0.2)  # same id: no new sample
    view.apply_statuses({"p": prefill_step(4, 2, 1024, 60.0)}, now=0.3)
    view.apply_statuses({"p": prefill_step(5, 1)}, now=0.4)  # id went back: ignored
    decode = status("d", 5, 5, profiling_id=3, num_scheduled_prefill_tokens=9, step_duration=1.0)
    view.apply_statuses({"d": decode}, now=0.5)
    assert view.take_profiling_samples() == [
        ProfilingSample("p", 256, 20.0), ProfilingSample("p", 1024, 60.0)]
    assert view.take_profiling_samples() == []


def test_profiling_needs_a_full_replace() -> None:
    view = view_with(meta("p", InferType.PREFILL))
    view.apply_statuses({"p": status("p", 1, 1)}, now=0.0)
    partial = status("p", 2, 1, profiling_id=0, num_scheduled_prefill_tokens=9,
                     step_duration=5.0)
    view.apply_statuses({"p": partial}, now=0.1)
    assert view.take_profiling_samples() == []


@pytest.mark.parametrize(("tokens", "duration_ms", "kept"), [
    (100, 1e-3, True),
    (100, 1e6, True),
    (100, 9e-4, False),
    (100, 1.1e6, False),
    (100, 0.0, False),
    (0, 10.0, False),
])
def test_profiling_samples_are_range_checked(tokens: int, duration_ms: float,
                                             kept: bool) -> None:
    view = view_with(meta("p", InferType.PREFILL))
    view.apply_statuses({"p": prefill_step(1, 0, tokens, duration_ms)}, now=0.0)
    assert bool(view.take_profiling_samples()) is kept


def test_profiling_mark_resets_when_the_status_vanishes() -> None:
    view = view_with(meta("p", InferType.PREFILL))
    view.apply_statuses({"p": prefill_step(1, 5)}, now=0.0)
    view.apply_statuses({"p": None}, now=0.1)
    view.apply_statuses({"p": prefill_step(2, 0)}, now=0.2)  # restarted engine
    assert len(view.take_profiling_samples()) == 2


def test_by_infer_type_groups_by_metadata() -> None:
    view = view_with(meta("p2", InferType.PREFILL), meta("d1", InferType.DECODE),
                     meta("p1", InferType.PREFILL), meta("n1"))
    assert view.by_infer_type(InferType.PREFILL) == ["p1", "p2"]
    assert view.by_infer_type(InferType.DECODE) == ["d1"]
    assert view.by_infer_type(InferType.NEUTRAL) == ["n1"]


def test_unavailability_raises_until_marked_available() -> None:
    view = CmsView()
    assert view.available
    view.require_available()
    view.mark_unavailable("redis: connection refused")
    assert not view.available
    with pytest.raises(CmsUnavailableError, match="connection refused") as info:
        view.require_available()
    assert isinstance(info.value, PrescientError)
    view.mark_available()
    view.require_available()
