"""Turn simulated request records into the numbers policies are compared on.

The simulator's output is a list of `RequestRecord` per policy; comparing policies needs a
small, fixed set of latency statistics, throughput and SLO attainment computed the same way
for every policy. This module is pure (no I/O, no clock) so the same code serves the CLI
table, the results file and the tests.

Two choices shape the numbers:

* Warm-up/cool-down trimming: only requests that *arrive* inside
  ``[first_arrival + warmup_s, last_arrival - cooldown_s]`` are measured, so an empty
  cluster at the start and a draining one at the end do not flatter or penalise a policy.
* Determinism: run summaries must be byte-identical across two runs with the same seed, so
  `summary_to_json` rounds every float to 6 significant digits (`round_floats`) and encodes
  with sorted keys. Six significant digits keeps microsecond resolution for latencies under
  a second and hides last-bit float noise (e.g. summation order) that would otherwise leak
  into the bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import msgspec
import numpy as np

from prescient.sim.records import RequestRecord

__all__ = [
    "SIGNIFICANT_DIGITS",
    "SloSpec",
    "Stats",
    "Summary",
    "compute_stats",
    "round_floats",
    "summarize",
    "summary_to_json",
    "to_deterministic_json",
]

SIGNIFICANT_DIGITS = 6
"""Floats in JSON output are rounded to this many significant digits."""


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """Distribution of one latency metric, in seconds.

    Percentiles use numpy's default (linear interpolation). Every float field is None when
    no request had a value (``count == 0``).
    """

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None


class SloSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Latency targets a request must meet to count as attained. None means not checked."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"SloSpec.{name} must be a positive number or None, got {value}")


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """One policy's run, reduced to the numbers the comparison table and results file show.

    Counts refer to the measured requests (those arriving inside the trimmed window):
    ``num_requests == num_completed + num_rejected + num_unfinished``.
    """

    policy: str
    num_requests: int
    num_completed: int
    num_rejected: int
    num_unfinished: int
    ttft: Stats
    tpot: Stats
    e2e: Stats
    queueing: Stats
    output_tokens: int  # summed over completed requests
    throughput_rps: float  # completed requests / duration_s
    throughput_tok_s: float  # output_tokens / duration_s
    slo_attainment: float | None  # None when no SloSpec was given
    num_preemptions: int
    preempted_requests: int
    duration_s: float  # first measured arrival to last measured finish


def compute_stats(values: Sequence[float]) -> Stats:
    """Summarise a list of latencies.

    Args:
        values: Latencies in seconds, in any order.

    Returns:
        Mean, median, p90, p99 (numpy linear interpolation) and max; all None if empty.
    """
    if len(values) == 0:
        return Stats(count=0)
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = (float(p) for p in np.percentile(arr, [50.0, 90.0, 99.0]))
    return Stats(
        count=int(arr.size),
        mean=float(arr.mean()),
        p50=p50,
        p90=p90,
        p99=p99,
        max=float(arr.max()),
    )


def _is_completed(record: RequestRecord) -> bool:
    return not record.rejected and record.finish_time is not None


def _meets_slo(record: RequestRecord, slo: SloSpec) -> bool:
    """A completed request meets the SLO if every given target holds (<=)."""
    if not _is_completed(record):
        return False
    if slo.ttft_s is not None:
        ttft = record.ttft
        if ttft is None or ttft > slo.ttft_s:
            return False
    if slo.tpot_s is not None:
        tpot = record.tpot  # None for one-token outputs: nothing to check
        if tpot is not None and tpot > slo.tpot_s:
            return False
    return True


def _measured(
    records: Sequence[RequestRecord], warmup_s: float, cooldown_s: float
) -> list[RequestRecord]:
    if warmup_s < 0 or cooldown_s < 0:
        raise ValueError(
            f"warmup_s and cooldown_s must be >= 0, got warmup_s={warmup_s}, "
            f"cooldown_s={cooldown_s}"
        )
    if not records:
        raise ValueError("cannot summarize a run with no requests")
    t_first = min(r.arrival_time for r in records)
    t_last = max(r.arrival_time for r in records)
    lo, hi = t_first + warmup_s, t_last - cooldown_s
    measured = [r for r in records if lo <= r.arrival_time <= hi]
    if not measured:
        raise ValueError(
            f"warm-up ({warmup_s} s) and cool-down ({cooldown_s} s) leave no requests to "
            f"measure: arrivals span only {t_last - t_first:.6g} s "
            f"({t_first:.6g} s to {t_last:.6g} s)"
        )
    return measured


def _defined(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def summarize(
    policy: str,
    records: Sequence[RequestRecord],
    *,
    slo: SloSpec | None = None,
    warmup_s: float = 0.0,
    cooldown_s: float = 0.0,
) -> Summary:
    """Reduce one policy's request records to a `Summary`.

    Latency stats cover every measured, non-rejected request for which the metric is
    defined: TTFT and queueing delay include requests that started but did not finish, E2E
    and TPOT only finished ones, and TPOT skips one-token outputs.

    Args:
        policy: Name of the policy that produced the records.
        records: Every request of the run, in any order.
        slo: Targets for SLO attainment; None leaves ``slo_attainment`` None.
        warmup_s: Ignore requests arriving less than this long after the first arrival.
        cooldown_s: Ignore requests arriving less than this long before the last arrival.

    Returns:
        The summary over the measured requests.

    Raises:
        ValueError: If there are no records, trimming is negative, or trimming leaves no
            request to measure.
    """
    measured = _measured(records, warmup_s, cooldown_s)
    live = [r for r in measured if not r.rejected]
    completed = [r for r in live if r.finish_time is not None]
    num_rejected = len(measured) - len(live)

    start = min(r.arrival_time for r in measured)
    finishes = [r.finish_time for r in completed if r.finish_time is not None]
    end = max(finishes) if finishes else max(r.arrival_time for r in measured)
    duration = max(end - start, 0.0)
    output_tokens = sum(r.output_len for r in completed)
    if duration > 0:
        throughput_rps = len(completed) / duration
        throughput_tok_s = output_tokens / duration
    else:
        throughput_rps = throughput_tok_s = 0.0

    attainment = None
    if slo is not None:
        attainment = sum(_meets_slo(r, slo) for r in measured) / len(measured)

    return Summary(
        policy=policy,
        num_requests=len(measured),
        num_completed=len(completed),
        num_rejected=num_rejected,
        num_unfinished=len(live) - len(completed),
        ttft=compute_stats(_defined([r.ttft for r in live])),
        tpot=compute_stats(_defined([r.tpot for r in live])),
        e2e=compute_stats(_defined([r.e2e for r in live])),
        queueing=compute_stats(_defined([r.queueing_delay for r in live])),
        output_tokens=output_tokens,
        throughput_rps=throughput_rps,
        throughput_tok_s=throughput_tok_s,
        slo_attainment=attainment,
        num_preemptions=sum(r.num_preemptions for r in measured),
        preempted_requests=sum(1 for r in measured if r.num_preemptions > 0),
        duration_s=duration,
    )


def _round_float(x: float, digits: int) -> float | None:
    if not math.isfinite(x):
        return None  # JSON has no NaN/inf; msgspec would write null anyway
    if x == 0.0:
        return 0.0  # also turns -0.0 into 0.0
    return float(f"{x:.{digits}g}")


def round_floats(obj: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """Round every float inside plain data (dicts, lists, tuples) to `digits` significant digits.

    Non-finite floats become None. Other values are returned unchanged; tuples become lists.

    Args:
        obj: Builtin data, as produced by `msgspec.to_builtins`.
        digits: Significant digits to keep.

    Returns:
        A copy of `obj` with rounded floats.
    """
    if isinstance(obj, float):
        return _round_float(obj, digits)
    if isinstance(obj, Mapping):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [round_floats(v, digits) for v in obj]
    return obj


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON: {obj!r}")


def to_deterministic_json(obj: object, *, indent: int = 0) -> bytes:
    """Encode data as JSON whose bytes depend only on its (rounded) values.

    Structs, dicts and paths are accepted; floats are rounded with `round_floats` and object
    keys are sorted.

    Args:
        obj: What to encode.
        indent: Pretty-print with this indent (0 = compact, one line).

    Returns:
        UTF-8 JSON bytes, without a trailing newline.
    """
    builtins = round_floats(msgspec.to_builtins(obj, enc_hook=_enc_hook))
    data = msgspec.json.encode(builtins, order="sorted")
    return msgspec.json.format(data, indent=indent) if indent else data


def summary_to_json(summaries: Sequence[Summary]) -> bytes:
    """Encode summaries as a JSON list, deterministically.

    Floats keep `SIGNIFICANT_DIGITS` significant digits and keys are sorted, so two runs
    with the same seed print identical bytes. Summaries keep the given order.

    Args:
        summaries: One summary per policy.

    Returns:
        Compact UTF-8 JSON bytes (a list of objects), without a trailing newline.
    """
    return to_deterministic_json(list(summaries))
