"""The instance-status local account: dispatches the CMS has not seen yet.

An instance's status in the CMS lags the scheduler by a push interval plus a poll interval, so a
burst of dispatches would all land on the instance that looked emptiest. The local account
(upstream `pkg/cms/instance_status_local_account.go`) counts every leg dispatched to an
instance until the instance's own status shows it, and policies add these in-flight counts to
the status fields.

Lifecycle of one entry, keyed by (request id, instance id)::

    add ──► counted ──(id in recent_waiting)──► found: not counted, kept while waiting
               │                                   │
               │ not waiting, older than staleness  │ no longer waiting
               ▼                                   ▼
            expired (uncounted, deleted)         deleted

A counted entry adds to the five per-instance totals: prefill legs (and neutral ones) add one
request and their *uncomputed* prompt tokens to the prefill side; decode legs (and neutral
ones) add one request and their prompt tokens to the decode side; every entry adds one to the
request total. Totals are running sums, so reading them is O(1).

Engine ids differ from gateway ids by vLLM's prefixes and suffixes; `normalize_request_id`
maps them back before reconciliation (see its docstring for the rule, which fixes upstream's
UUID truncation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec
import numpy as np

from prescient.model import InferType

_ENGINE_PREFIXES = ("cmpl-", "chatcmpl-")
_ENGINE_SUFFIX = re.compile(r"-(?:[0-9a-fA-F]{8}|[0-9]+)$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")
_PREFILL_SIDE = frozenset({InferType.PREFILL, InferType.NEUTRAL})
_DECODE_SIDE = frozenset({InferType.DECODE, InferType.NEUTRAL})


def normalize_request_id(engine_id: str) -> str:
    """Map an id the engine reports back to the id the gateway dispatched.

    The gateway forces `x-request-id`; vLLM's OpenAI server decorates it as
    `cmpl-<id>-<index>` or `chatcmpl-<id>[-<8 hex>]`, and a `+<...>` tail may follow. Engines
    that do not decorate (SGLang, the simulated engine) report the id as it was sent. The
    rule, in order:

    1. if a `+` is present, cut at the first `+`;
    2. strip one `cmpl-` or `chatcmpl-` prefix; without one the id was not decorated: done;
    3. keep a bare canonical UUID (8-4-4-4-12 hex) whole;
    4. otherwise cut one trailing `-<8 hex>` or `-<digits>` suffix, if something remains.

    Upstream cuts at the last `-` whenever there is no `+`, which truncates undecorated ids and
    bare UUIDs alike (upstream bug §11.11); only cutting what the prefix announces fixes both.
    """
    rid = engine_id.split("+", 1)[0]
    for prefix in _ENGINE_PREFIXES:
        if rid.startswith(prefix):
            rid = rid[len(prefix):]
            break
    else:
        return rid
    if _UUID.match(rid):
        return rid
    match = _ENGINE_SUFFIX.search(rid)
    if match is not None and match.start() > 0:
        return rid[: match.start()]
    return rid


class AccountTotals(msgspec.Struct, frozen=True):
    """One instance's in-flight dispatches the CMS has not seen yet (upstream names)."""

    num_inflight_dispatch_prefill_requests: int = 0  # prefill and neutral legs
    num_inflight_dispatch_decode_requests: int = 0  # decode and neutral legs
    num_inflight_dispatch_requests: int = 0  # distinct requests
    num_uncomputed_tokens_inflight_dispatch_prefill_requests: int = 0  # tokens
    num_tokens_inflight_dispatch_decode_requests: int = 0  # tokens


_ZERO_COUNTS = (0, 0, 0, 0, 0)
_NO_QUEUE = (np.zeros(0), np.zeros(0))


class _Entry:
    """One request on one instance. While `found_in_cms` is False it is counted in the totals."""

    __slots__ = ("found_in_cms", "infer_type", "num_tokens", "num_uncomputed_tokens",
                 "scheduled_at")

    def __init__(self, infer_type: InferType, num_tokens: int, num_uncomputed_tokens: int,
                 scheduled_at: float) -> None:
        self.infer_type = infer_type
        self.num_tokens = num_tokens  # prompt tokens, counted on the decode side
        self.num_uncomputed_tokens = num_uncomputed_tokens  # counted on the prefill side
        self.scheduled_at = scheduled_at  # seconds
        self.found_in_cms = False


class _PrefillJournal:
    """Which instances' prefill sides changed, and in which order: a reader of the in-flight
    prefill queues follows the changes since its last read instead of reading every instance.

    Each change takes the next serial; `changed` holds each instance once, at its latest
    serial, oldest first (a dict keeps insertion order and moves nothing on lookup).
    """

    __slots__ = ("changed", "serial")

    def __init__(self) -> None:
        self.serial = 0
        self.changed: dict[str, int] = {}

    def new_serial(self) -> int:
        self.serial += 1
        return self.serial

    def touch(self, instance_id: str) -> int:
        serial = self.serial = self.serial + 1
        changed = self.changed
        changed.pop(instance_id, None)
        changed[instance_id] = serial
        return serial

    def since(self, serial: int) -> list[str]:
        out = []
        for instance_id in reversed(self.changed):
            if self.changed[instance_id] <= serial:
                break
            out.append(instance_id)
        return out


class _InstanceAccount:
    """Entries of one instance plus the running sums of its counted entries."""

    __slots__ = ("decode_tokens", "entries", "found", "instance_id", "journal", "num_decode",
                 "num_prefill", "num_requests", "prefill_epoch", "prefill_queue",
                 "prefill_tail", "prefill_uncomputed_tokens")

    def __init__(self, instance_id: str, journal: _PrefillJournal) -> None:
        self.instance_id = instance_id
        self.journal = journal
        self.entries: dict[str, _Entry] = {}  # in dispatch order, so oldest first
        self.found: set[str] = set()  # ids of the entries the CMS has shown
        self.num_prefill = 0
        self.num_decode = 0
        self.num_requests = 0
        self.prefill_uncomputed_tokens = 0
        self.decode_tokens = 0
        # (dispatch times, uncomputed tokens) of the counted prefill-side entries, in dispatch
        # order; appends extend it, any other prefill-side change drops it (None) and starts a
        # new epoch, so a reader that kept a prefix knows whether it is still a prefix
        self.prefill_tail: tuple[list[float], list[float]] | None = ([], [])
        self.prefill_epoch = journal.new_serial()
        self.prefill_queue: tuple[np.ndarray, np.ndarray] | None = None  # numpy copy

    def count_leg(self, infer_type: InferType, num_tokens: int, num_uncomputed_tokens: int,
                  sign: int) -> None:
        """Add (`sign=1`) or remove (`sign=-1`) one leg's sides, not the request itself."""
        if infer_type in _PREFILL_SIDE:
            self.num_prefill += sign
            self.prefill_uncomputed_tokens += sign * num_uncomputed_tokens
            self.prefill_queue = None
            self.prefill_tail = None
            self.prefill_epoch = self.journal.touch(self.instance_id)
        if infer_type in _DECODE_SIDE:
            self.num_decode += sign
            self.decode_tokens += sign * num_tokens

    def append_leg(self, entry: _Entry) -> None:
        """Count a new entry, the newest of the instance: on the prefill side an append (the
        tail grows, the epoch stays)."""
        infer_type = entry.infer_type
        if infer_type in _PREFILL_SIDE:
            self.num_prefill += 1
            self.prefill_uncomputed_tokens += entry.num_uncomputed_tokens
            self.prefill_queue = None
            self.journal.touch(self.instance_id)
            tail = self.prefill_tail
            if tail is not None:
                tail[0].append(entry.scheduled_at)
                tail[1].append(float(entry.num_uncomputed_tokens))
        if infer_type in _DECODE_SIDE:
            self.num_decode += 1
            self.decode_tokens += entry.num_tokens
        self.num_requests += 1

    def uncount(self, entry: _Entry) -> None:
        """Take a counted entry out of the totals (it stays in `entries`)."""
        if not entry.found_in_cms:
            self.count_leg(entry.infer_type, entry.num_tokens, entry.num_uncomputed_tokens, -1)
            self.num_requests -= 1
            entry.found_in_cms = True

    def prefill_log(self) -> tuple[int, list[float], list[float]]:
        if self.prefill_tail is None:
            counted = [(e.scheduled_at, float(e.num_uncomputed_tokens))
                       for e in self.entries.values()
                       if not e.found_in_cms and e.infer_type in _PREFILL_SIDE]
            self.prefill_tail = ([t for t, _ in counted], [x for _, x in counted])
        return self.prefill_epoch, *self.prefill_tail

    def inflight_prefills(self) -> tuple[np.ndarray, np.ndarray]:
        if self.prefill_queue is None:
            _, times, tokens = self.prefill_log()
            self.prefill_queue = (np.array(times, np.float64), np.array(tokens, np.float64))
        return self.prefill_queue


class LocalAccount:
    """Per-instance in-flight dispatch counts, reconciled against each new CMS status.

    Args:
        staleness_s: an entry the engine never reported is expired this many seconds after its
            dispatch (`--request-local-account-staleness-seconds`).
    """

    def __init__(self, staleness_s: float = 10.0) -> None:
        self.staleness_s = staleness_s
        self._accounts: dict[str, _InstanceAccount] = {}
        self._journal = _PrefillJournal()
        self._where: dict[str, set[str]] = {}  # request id -> instance ids with an entry

    def add(self, request_id: str, instance_id: str, infer_type: InferType, num_tokens: int,
            num_uncomputed_tokens: int, now: float) -> bool:
        """Count one dispatched leg. Returns False (and changes nothing) for a duplicate.

        A prefill leg and a decode leg of the same request on the same instance merge into one
        NEUTRAL entry: the second add counts only its own side, the request total stays one,
        and the entry keeps the prefill leg's uncomputed tokens and the decode leg's tokens so
        that removal subtracts exactly what was added. A leg whose side is already present, or
        any add after the instance reported the request, is a duplicate.

        Args:
            num_tokens: prompt tokens (tokens).
            num_uncomputed_tokens: prompt tokens minus the prefix-cache hit (tokens).
            now: dispatch time (seconds).
        """
        if num_tokens < 0 or num_uncomputed_tokens < 0:
            raise ValueError(f"request {request_id}: token counts must be >= 0")
        account = self._accounts.get(instance_id)
        if account is None:
            account = self._accounts[instance_id] = _InstanceAccount(instance_id, self._journal)
        entry = account.entries.get(request_id)
        if entry is None:
            entry = account.entries[request_id] = _Entry(infer_type, num_tokens,
                                                         num_uncomputed_tokens, now)
            account.append_leg(entry)
            self._where.setdefault(request_id, set()).add(instance_id)
            return True
        return self._merge(account, entry, infer_type, num_tokens, num_uncomputed_tokens)

    @staticmethod
    def _merge(account: _InstanceAccount, entry: _Entry, infer_type: InferType, num_tokens: int,
               num_uncomputed_tokens: int) -> bool:
        """Turn a counted one-sided entry into NEUTRAL with the other side; False if overlapping."""
        sides = {entry.infer_type, infer_type}
        if entry.found_in_cms or sides != {InferType.PREFILL, InferType.DECODE}:
            return False
        account.count_leg(infer_type, num_tokens, num_uncomputed_tokens, 1)
        if infer_type == InferType.DECODE:
            entry.num_tokens = num_tokens
        else:
            entry.num_uncomputed_tokens = num_uncomputed_tokens
        entry.infer_type = InferType.NEUTRAL
        return True

    def revert_prefill(self, request_id: str, instance_id: str) -> None:
        """Undo a prefill add whose decode leg could not be placed in the same schedule call.

        A prefill-only entry is removed (request total included; upstream forgot that one); a
        NEUTRAL entry falls back to DECODE; anything else is left alone.
        """
        account = self._accounts.get(instance_id)
        entry = account.entries.get(request_id) if account is not None else None
        if account is None or entry is None or entry.infer_type == InferType.DECODE:
            return
        if entry.infer_type == InferType.PREFILL:
            self._delete(account, request_id, instance_id)
            return
        if not entry.found_in_cms:
            account.count_leg(InferType.PREFILL, 0, entry.num_uncomputed_tokens, -1)
        entry.infer_type = InferType.DECODE

    def reconcile(self, instance_id: str, recent_waiting: Iterable[str], waiting: Iterable[str],
                  now: float) -> None:
        """Settle the instance's entries against a freshly replaced status.

        Ids are normalised first. Then, for each entry, three rules in this order (upstream
        order; rule 2 sees the effect of rule 1 in the same pass):

        1. not found and in `recent_waiting` -> mark found, uncount it, keep the entry (its
           uncomputed tokens still feed `waiting_uncomputed_tokens`);
        2. found and not in `waiting` -> delete the entry;
        3. not found, not in `waiting`, and `now - dispatch >= staleness_s` -> uncount and
           delete (expired: the engine never reported it, e.g. it was lost or finished between
           two statuses).

        Args:
            recent_waiting: engine ids that entered the waiting queue recently.
            waiting: all engine ids now waiting.
            now: current time (seconds).
        """
        account = self._accounts.get(instance_id)
        if account is None:
            return
        entries = account.entries
        still_waiting = {normalize_request_id(rid) for rid in waiting}
        # Cost follows the status (its id lists) and the expiring entries, not the account:
        # at thousands of requests/s an account holds tens of thousands of entries.
        for request_id in {normalize_request_id(rid) for rid in recent_waiting}:
            entry = entries.get(request_id)
            if entry is not None and not entry.found_in_cms:
                account.uncount(entry)
                account.found.add(request_id)
        for request_id in [rid for rid in account.found if rid not in still_waiting]:
            self._delete(account, request_id, instance_id)
        expired = []
        for request_id, entry in entries.items():
            if now - entry.scheduled_at < self.staleness_s:
                break  # dispatch order: every later entry is younger
            if not entry.found_in_cms and request_id not in still_waiting:
                expired.append(request_id)
        for request_id in expired:
            self._delete(account, request_id, instance_id)

    def release(self, request_id: str) -> list[str]:
        """Remove the request from every instance; returns the instance ids touched, sorted."""
        where = self._where.pop(request_id, None)
        if where is None:
            return []
        touched = sorted(where)
        for instance_id in touched:  # `_delete` without the reverse index: it is gone already
            account = self._accounts[instance_id]
            account.uncount(account.entries.pop(request_id))
            account.found.discard(request_id)
        return touched

    def totals(self, instance_id: str) -> AccountTotals:
        """The instance's in-flight totals; zeros for an instance with no account. O(1)."""
        return AccountTotals(*self.counts(instance_id))

    def counts(self, instance_id: str) -> tuple[int, int, int, int, int]:
        """`totals` as a plain tuple in `AccountTotals` field order, for the dispatcher's
        per-decision row update (no struct to build)."""
        account = self._accounts.get(instance_id)
        if account is None:
            return _ZERO_COUNTS
        return (account.num_prefill, account.num_decode, account.num_requests,
                account.prefill_uncomputed_tokens, account.decode_tokens)

    def inflight_prefills(self, instance_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Dispatch times (s) and uncomputed tokens of the prefill-side legs counted on the
        instance, in dispatch order: the prompts its last status did not show yet.

        Their tokens sum to `num_uncomputed_tokens_inflight_dispatch_prefill_requests`.
        Predictor-enhanced scheduling replays them, each from its dispatch, behind the
        status's backlog. Cached until the instance's prefill side changes, so repeated reads
        between two dispatches cost O(1). The arrays are shared: do not modify them.
        """
        account = self._accounts.get(instance_id)
        return _NO_QUEUE if account is None else account.inflight_prefills()

    def prefill_serial(self) -> int:
        """The serial of the latest prefill-side change of any instance (see `prefill_changes`)."""
        return self._journal.serial

    def prefill_changes(self, since: int) -> list[str]:
        """Ids of the instances whose prefill side changed after serial `since`, newest first:
        in O(changes), so a reader need not look at every instance per dispatch."""
        return self._journal.since(since)

    def prefill_log(self, instance_id: str) -> tuple[int, list[float], list[float]]:
        """`inflight_prefills` as (epoch, dispatch times, uncomputed tokens), lists.

        While the epoch stays the same the lists only grew at the end (new dispatches), so a
        reader that replayed a prefix can continue with the rest; a new epoch (a prompt
        reconciled, released, expired or merged) means start over. An instance without an
        account has epoch -1 and no entries. The lists are shared: do not modify them.
        """
        account = self._accounts.get(instance_id)
        return (-1, [], []) if account is None else account.prefill_log()

    def waiting_uncomputed_tokens(self, instance_id: str, waiting: Iterable[str]) -> int:
        """Σ uncomputed tokens of this instance's entries whose ids are waiting (tokens).

        Cache-aware scheduling overwrites the status' `num_uncomputed_tokens_all_waiting_prefills`
        with this, since the engine's own figure ignores the prefix hit. Waiting ids unknown to
        the account (preempted or migrated in) count 0; ids are normalised and de-duplicated.
        """
        account = self._accounts.get(instance_id)
        if account is None:
            return 0
        entries = account.entries
        ids = {normalize_request_id(rid) for rid in waiting}
        return sum(entries[rid].num_uncomputed_tokens for rid in ids if rid in entries)

    def drop_instance(self, instance_id: str) -> None:
        """Forget an instance that left the CMS, with all its entries."""
        account = self._accounts.pop(instance_id, None)
        if account is not None:
            self._journal.touch(instance_id)
        for request_id in account.entries if account is not None else ():
            self._unindex(request_id, instance_id)

    def _delete(self, account: _InstanceAccount, request_id: str, instance_id: str) -> None:
        """Uncount (if still counted) and remove one entry, keeping the reverse index in step."""
        account.uncount(account.entries.pop(request_id))
        account.found.discard(request_id)
        self._unindex(request_id, instance_id)

    def _unindex(self, request_id: str, instance_id: str) -> None:
        where = self._where[request_id]
        where.discard(instance_id)
        if not where:
            del self._where[request_id]
