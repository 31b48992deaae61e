"""Set diffing and subscriber notification shared by the live resolvers."""

from __future__ import annotations

from collections.abc import Sequence

from prescient.discovery.base import DiscoveredInstance
from prescient.discovery.instance_set import InstanceSet


def inst(iid: str, port: int = 8000) -> DiscoveredInstance:
    return DiscoveredInstance(instance_id=iid, host="h", port=port)


def test_subscribers_get_the_current_set_at_once_and_after_each_change_only() -> None:
    seen: list[list[str]] = []
    s = InstanceSet("test")
    s.replace([inst("b"), inst("a")])
    s.subscribe(lambda xs: seen.append([x.instance_id for x in xs]))
    assert seen == [["a", "b"]]
    assert s.replace([inst("a"), inst("b")]) is False  # same set, other order
    assert s.replace([inst("a")]) is True
    assert seen == [["a", "b"], ["a"]]


def test_a_changed_endpoint_under_the_same_id_is_a_change() -> None:
    s = InstanceSet("test")
    s.replace([inst("a", 8000)])
    assert s.replace([inst("a", 8001)]) is True
    assert s.instances()[0].port == 8001


def test_a_failing_subscriber_does_not_starve_the_others() -> None:
    got: list[Sequence[DiscoveredInstance]] = []

    def broken(_: Sequence[DiscoveredInstance]) -> None:
        raise RuntimeError("boom")

    s = InstanceSet("test")
    s.subscribe(lambda xs: None)
    s._listeners.insert(0, broken)  # subscribed first, so it runs first
    s.subscribe(got.append)
    s.replace([inst("a")])
    assert [x.instance_id for x in got[-1]] == ["a"]
