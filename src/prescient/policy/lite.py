"""Lite-mode local real-time state: the scheduler's own per-instance load, no CMS needed.

In lite mode (`--enable-full-mode-scheduling=false`) the scheduler never reads engine statuses.
It balances on what it has handed out itself (upstream `pkg/lrs/local_realtime_state.go`): per
instance, the requests allocated there and their token counts, raised by the gateway's
`state_update` reports and dropped on release.

Contract: a request is **always released on completion** (and when its gateway's keepalive
drops). Upstream releases only when the gateway's `--requests-report-duration` is non-zero,
which it is not by default, so counts there only fall when a gateway disconnects (upstream bug
§11.9). Callers of `LiteState` must call `release` when a request finishes or fails.

Differences from upstream, on purpose: one `LiteState` holds every instance (upstream keeps
one per infer type), a request may be allocated on several instances (its prefill and decode
legs), and an unregistered gateway id is accepted (the gateway registry lives elsewhere).
"""

from __future__ import annotations


class _LiteEntry:
    """One request on one instance."""

    __slots__ = ("gateway_id", "num_tokens", "prefill_complete")

    def __init__(self, num_tokens: int, gateway_id: str) -> None:
        self.num_tokens = num_tokens  # tokens; only ever raised
        self.gateway_id = gateway_id
        self.prefill_complete = False


class _LiteInstance:
    """Entries of one instance with running sums, so every count is O(1)."""

    __slots__ = ("entries", "num_tokens", "num_waiting_requests", "num_waiting_tokens",
                 "version")

    def __init__(self, version: int) -> None:
        self.version = version
        self.entries: dict[str, _LiteEntry] = {}
        self.num_tokens = 0
        self.num_waiting_requests = 0  # entries whose prefill is not complete
        self.num_waiting_tokens = 0  # their tokens

    def adjust(self, entry: _LiteEntry, tokens: int, sign: int) -> None:
        """Add (`sign=1`) or remove (`sign=-1`) `tokens` of `entry` from the sums."""
        self.num_tokens += sign * tokens
        if not entry.prefill_complete:
            self.num_waiting_tokens += sign * tokens


class LiteState:
    """Requests and tokens allocated per instance by this scheduler (lite mode)."""

    def __init__(self) -> None:
        self._instances: dict[str, _LiteInstance] = {}
        self._where: dict[str, set[str]] = {}  # request id -> instance ids
        self._by_gateway: dict[str, set[tuple[str, str]]] = {}  # -> (request id, instance id)

    def add_instance(self, instance_id: str, version: int = 0) -> None:
        """Register an instance. A higher `version` (a restart) wipes its old states; an equal or
        lower one is ignored."""
        old = self._instances.get(instance_id)
        if old is not None and version <= old.version:
            return
        if old is not None:
            self.remove_instance(instance_id)
        self._instances[instance_id] = _LiteInstance(version)

    def remove_instance(self, instance_id: str) -> None:
        """Forget an instance and every request state allocated on it."""
        inst = self._instances.get(instance_id)
        for request_id in list(inst.entries) if inst is not None else ():
            self._free(request_id, instance_id)
        self._instances.pop(instance_id, None)

    def allocate(self, request_id: str, instance_id: str, num_tokens: int,
                 gateway_id: str = "") -> bool:
        """Count a request dispatched to an instance with `num_tokens` prompt tokens.

        Returns False, changing nothing, when the instance is unknown or the request is already
        allocated there.
        """
        if num_tokens < 0:
            raise ValueError(f"request {request_id}: num_tokens must be >= 0")
        inst = self._instances.get(instance_id)
        if inst is None or request_id in inst.entries:
            return False
        entry = _LiteEntry(num_tokens, gateway_id)
        inst.entries[request_id] = entry
        inst.num_waiting_requests += 1
        inst.adjust(entry, num_tokens, 1)
        self._where.setdefault(request_id, set()).add(instance_id)
        self._by_gateway.setdefault(gateway_id, set()).add((request_id, instance_id))
        return True

    def update(self, request_id: str, instance_id: str, num_tokens: int) -> bool:
        """Raise the request's token count to `num_tokens` (a `state_update` report).

        A lower count is ignored: reports may arrive out of order, and the count only grows as
        the request generates. Returns False when the request is not allocated there.
        """
        entry = self._entry(request_id, instance_id)
        if entry is None:
            return False
        if num_tokens > entry.num_tokens:
            self._instances[instance_id].adjust(entry, num_tokens - entry.num_tokens, 1)
            entry.num_tokens = num_tokens
        return True

    def mark_prefill_complete(self, request_id: str, instance_id: str) -> bool:
        """Record that the request's prefill finished there (a neutral `prefill_done` report).

        It changes only `num_waiting_requests`/`num_waiting_tokens` (upstream uses them for
        metrics); `num_requests` and `num_tokens` still count the request until release. Returns
        False when the request is not allocated there.
        """
        entry = self._entry(request_id, instance_id)
        if entry is None:
            return False
        if not entry.prefill_complete:
            inst = self._instances[instance_id]
            inst.num_waiting_requests -= 1
            inst.num_waiting_tokens -= entry.num_tokens
            entry.prefill_complete = True
        return True

    def release(self, request_id: str) -> list[str]:
        """Free the request on every instance it holds; returns those instance ids, sorted."""
        touched = sorted(self._where.get(request_id, ()))
        for instance_id in touched:
            self._free(request_id, instance_id)
        return touched

    def release_gateway(self, gateway_id: str) -> list[str]:
        """Free every request state a gateway allocated (its keepalive dropped).

        Returns the request ids freed, sorted.
        """
        owned = self._by_gateway.pop(gateway_id, set())
        for request_id, instance_id in owned:
            self._free(request_id, instance_id)
        return sorted({request_id for request_id, _ in owned})

    def num_requests(self, instance_id: str) -> int:
        """Requests allocated on the instance; 0 when unknown. O(1)."""
        inst = self._instances.get(instance_id)
        return 0 if inst is None else len(inst.entries)

    def num_tokens(self, instance_id: str) -> int:
        """Σ tokens of the requests allocated on the instance (tokens); 0 when unknown. O(1)."""
        inst = self._instances.get(instance_id)
        return 0 if inst is None else inst.num_tokens

    def num_waiting_requests(self, instance_id: str) -> int:
        """Allocated requests whose prefill is not marked complete; 0 when unknown. O(1)."""
        inst = self._instances.get(instance_id)
        return 0 if inst is None else inst.num_waiting_requests

    def num_waiting_tokens(self, instance_id: str) -> int:
        """Σ tokens of those requests (tokens); 0 when unknown. O(1)."""
        inst = self._instances.get(instance_id)
        return 0 if inst is None else inst.num_waiting_tokens

    def instance_ids(self) -> list[str]:
        """Registered instance ids, sorted."""
        return sorted(self._instances)

    def _entry(self, request_id: str, instance_id: str) -> _LiteEntry | None:
        inst = self._instances.get(instance_id)
        return None if inst is None else inst.entries.get(request_id)

    def _free(self, request_id: str, instance_id: str) -> None:
        """Remove one (request, instance) state from the instance, the index and its gateway."""
        inst = self._instances[instance_id]
        entry = inst.entries.pop(request_id)
        inst.adjust(entry, entry.num_tokens, -1)
        if not entry.prefill_complete:
            inst.num_waiting_requests -= 1
        where = self._where[request_id]
        where.discard(instance_id)
        if not where:
            del self._where[request_id]
        owned = self._by_gateway.get(entry.gateway_id)
        if owned is not None:
            owned.discard((request_id, instance_id))
            if not owned:
                del self._by_gateway[entry.gateway_id]
