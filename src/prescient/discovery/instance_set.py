"""The current instance set of a resolver, and the subscribers told when it changes.

Both live resolvers (Redis polling, etcd watching) compute a fresh set and hand it here; this
module decides whether anything changed and calls the subscribers. Upstream diffs by instance id
only, so an instance that moved to another port under the same id goes unnoticed; here two sets
differ when any field of any instance differs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prescient.discovery.base import DiscoveredInstance, Listener

log = logging.getLogger(__name__)


class InstanceSet:
    """Instances by id, plus subscribers; `replace` notifies them after a change."""

    def __init__(self, name: str) -> None:
        self._name = name  # e.g. "redis discovery", for the change log line
        self._by_id: dict[str, DiscoveredInstance] = {}
        self._listeners: list[Listener] = []

    def instances(self) -> list[DiscoveredInstance]:
        """The current set, sorted by instance id."""
        return [self._by_id[k] for k in sorted(self._by_id)]

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(current set)` now and after every change."""
        self._listeners.append(listener)
        listener(self.instances())

    def replace(self, instances: Iterable[DiscoveredInstance]) -> bool:
        """Make `instances` the current set; notify subscribers and return True if it changed."""
        new = {inst.instance_id: inst for inst in instances}
        if new == self._by_id:
            return False
        added = sorted(new.keys() - self._by_id.keys())
        removed = sorted(self._by_id.keys() - new.keys())
        changed = sorted(k for k in new.keys() & self._by_id.keys() if new[k] != self._by_id[k])
        self._by_id = new
        log.info("%s: %d instances (added %s, removed %s, changed %s)", self._name, len(new),
                 added or "-", removed or "-", changed or "-")
        current = self.instances()
        for listener in list(self._listeners):
            try:
                listener(current)
            except Exception:  # one broken subscriber must not starve the others
                log.exception("%s: a subscriber failed", self._name)
        return True
