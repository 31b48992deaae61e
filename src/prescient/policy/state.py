"""The cluster as columns: what every metric reads, one row per instance.

Scheduling must stay fast at thousands of instances, so metrics are numpy expressions over
columns rather than Python loops over instances. Rows are in instance-id order (which is also
the documented tie-break); statuses are written into `status` when the CMS view changes, the
local-account and lite-mode counts one row at a time as requests are dispatched and released.

The counts change on every dispatch and release, twice per request, while at a few instances
most decisions read them in plain Python (`LinearMetric`): each row is kept as a tuple and
copied into its numpy column only when a column is read (`account`, `lite`), so a request that
no numpy metric looks at costs no numpy write.

Column names of `status` are `InstanceStatus` field names; `S` maps a name to its column.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import numpy as np

from prescient.model import InferType, InstanceMetadata, InstanceStatus

STATUS_FIELDS = (
    "hybrid_scheduler_waiting_to_decode_requests_num",
    "scheduler_waiting_to_decode_requests_num",
    "num_waiting_requests",
    "scheduler_running_to_decode_requests_num",
    "num_running_requests",
    "num_loading_requests",
    "num_total_gpu_tokens",
    "num_used_gpu_tokens",
    "num_unallocated_tokens_hybrid_scheduler_waiting_decodes",
    "hybrid_scheduler_waiting_to_decode_tokens_num",
    "scheduler_waiting_to_decode_tokens_num",
    "num_uncomputed_tokens_scheduler_running_prefills",
    "num_unallocated_tokens_scheduler_running_prefills",
    "scheduler_running_to_decode_tokens_num",
    "num_tokens_loading_requests",
    "num_uncomputed_tokens_all_waiting_prefills",
    "timestamp_ms",
)
S = {name: i for i, name in enumerate(STATUS_FIELDS)}
ACCOUNT_FIELDS = (
    "num_inflight_dispatch_prefill_requests",
    "num_inflight_dispatch_decode_requests",
    "num_inflight_dispatch_requests",
    "num_uncomputed_tokens_inflight_dispatch_prefill_requests",
    "num_tokens_inflight_dispatch_decode_requests",
)
A = {name: i for i, name in enumerate(ACCOUNT_FIELDS)}
INFER_CODES = {InferType.PREFILL: 0, InferType.DECODE: 1, InferType.NEUTRAL: 2}
_ZERO_ACCOUNT = (0,) * len(ACCOUNT_FIELDS)


_VERSIONS = itertools.count()


class ClusterState:
    """Per-instance columns. Rebuilt when the instance set changes, updated row by row.

    `version` changes whenever the instance set or a status row does (not with the dispatch
    accounts), to a number no other state has had: what is computed from metadata and statuses
    alone may be kept until then.
    """

    def __init__(self, metadata: Sequence[InstanceMetadata] = ()) -> None:
        self.set_instances(metadata)

    def set_instances(self, metadata: Sequence[InstanceMetadata]) -> None:
        """Replace the instance set, keeping the columns of instances that stay."""
        self.version = next(_VERSIONS)
        old = getattr(self, "index", {})
        old_cols = getattr(self, "_columns", None)
        ordered = sorted(metadata, key=lambda m: m.instance_id)
        self.ids = tuple(m.instance_id for m in ordered)
        self.index = {iid: row for row, iid in enumerate(self.ids)}
        self.metadata = list(ordered)
        n = len(ordered)
        self.infer_type = np.array([INFER_CODES[m.instance_type] for m in ordered], np.int8)
        self.node = _codes([m.node_id for m in ordered])
        self.unit = _codes([m.unit_id or m.instance_id for m in ordered])
        self.dp_enabled = bool(ordered) and ordered[0].data_parallel_size > 1
        self.has_status = np.zeros(n, bool)
        self.schedulable = np.zeros(n, bool)
        self.status = np.zeros((n, len(STATUS_FIELDS)))
        old_rows = getattr(self, "account_rows", []), getattr(self, "lite_rows", [])
        # the dispatch counts: a tuple per row, copied into the numpy column when it is read
        self.account_rows: list[tuple[int, ...]] = [_ZERO_ACCOUNT] * n
        self.lite_rows: list[tuple[int, int]] = [(0, 0)] * n  # requests, tokens
        self._account = np.zeros((n, len(ACCOUNT_FIELDS)))
        self._lite = np.zeros((n, 2))
        self._account_stale: set[int] = set()
        self._lite_stale: set[int] = set()
        self.predicted_output = np.zeros(n)  # predicted output tokens of in-flight requests
        self._sums: dict[tuple[str, ...], tuple[np.ndarray, list[float]]] = {}
        self._sums_version = -1
        self._columns = (self.has_status, self.schedulable, self.status, self.predicted_output)
        if old_cols is not None:
            for iid, row in self.index.items():
                if iid in old:
                    for new_col, old_col in zip(self._columns, old_cols, strict=True):
                        new_col[row] = old_col[old[iid]]
                    self.set_account(row, old_rows[0][old[iid]])
                    self.set_lite(row, *old_rows[1][old[iid]])

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, instance_id: str) -> int | None:
        return self.index.get(instance_id)

    def first_row_after(self, instance_id: str) -> int:
        """The row of the first instance whose id sorts after `instance_id` (may be len)."""
        return bisect.bisect_right(self.ids, instance_id)

    def set_status(self, row: int, status: InstanceStatus | None) -> None:
        self.version = next(_VERSIONS)
        if status is None:
            self.has_status[row] = False
            self.schedulable[row] = False
            return
        self.has_status[row] = True
        self.schedulable[row] = status.schedulable
        self.status[row] = [getattr(status, f) for f in STATUS_FIELDS]

    def set_account(self, row: int, totals: tuple[int, ...]) -> None:
        """The row's local-account counts, in `ACCOUNT_FIELDS` order."""
        self.account_rows[row] = totals
        self._account_stale.add(row)

    def set_lite(self, row: int, num_requests: int, num_tokens: int) -> None:
        self.lite_rows[row] = (num_requests, num_tokens)
        self._lite_stale.add(row)

    @property
    def account(self) -> np.ndarray:
        """The local-account columns (rows x `ACCOUNT_FIELDS`); write with `set_account`."""
        if self._account_stale:
            _copy_rows(self._account, self.account_rows, self._account_stale)
        return self._account

    @property
    def lite(self) -> np.ndarray:
        """The lite-mode columns (rows x (requests, tokens)); write with `set_lite`."""
        if self._lite_stale:
            _copy_rows(self._lite, self.lite_rows, self._lite_stale)
        return self._lite

    def s(self, field: str) -> np.ndarray:
        """A status column by `InstanceStatus` field name."""
        return self.status[:, S[field]]

    def status_sum(self, *fields: str) -> np.ndarray:
        """The sum of these status columns, read-only, kept until `version` changes: metrics
        add the dispatch accounts to it on every decision, the statuses change only on polls."""
        return self._status_sums(fields)[0]

    def status_sum_list(self, fields: tuple[str, ...]) -> list[float]:
        """`status_sum(*fields)` as a list (for reads in plain Python); do not modify it."""
        return self._status_sums(fields)[1]

    def _status_sums(self, fields: tuple[str, ...]) -> tuple[np.ndarray, list[float]]:
        if self._sums_version != self.version:
            self._sums.clear()
            self._sums_version = self.version
        sums = self._sums.get(fields)
        if sums is None:
            total = self.status[:, [S[f] for f in fields]].sum(axis=1)
            total.flags.writeable = False
            sums = self._sums[fields] = (total, total.tolist())
        return sums

    def a(self, field: str) -> np.ndarray:
        """A local-account column by upstream aggregate name."""
        return self.account[:, A[field]]


def _copy_rows(column: np.ndarray, rows: list[tuple[int, ...]], stale: set[int]) -> None:
    for row in stale:
        column[row] = rows[row]
    stale.clear()


def _codes(values: Sequence[str]) -> np.ndarray:
    """Small integer codes for string labels (equal labels, equal codes)."""
    table: dict[str, int] = {}
    return np.array([table.setdefault(v, len(table)) for v in values], np.int64)
