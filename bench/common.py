"""Small helpers the benchmark scripts share: table cells and an in-process executor."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from functools import cache
from typing import Any

import msgspec

from prescient.config.presets import get_preset
from prescient.predict.slo import SloLatencyModel, TpotProfile, TtftProfile
from prescient.profiling import default_grids, profile_engine


class Inline(Executor):
    """`--jobs 1`: run submitted calls at once, in this process."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def ms(x: float | None) -> str:
    """Seconds as a milliseconds cell."""
    return "-" if x is None else f"{x * 1e3:.0f}" if x >= 1 else f"{x * 1e3:.1f}"


def pct(x: float | None) -> str:
    """A fraction as a percentage cell."""
    return "-" if x is None else f"{x * 100:.1f}%"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def goodput_cells(goodput: float | None, native_rps: float) -> list[str]:
    """A goodput (rate scale) as two cells: the scale and the request rate it means."""
    return ["-", "-"] if goodput is None else [f"{goodput:.4f}", f"{goodput * native_rps:.1f}"]


@cache
def preset_slo_model(preset: str, max_num_batched_tokens: int) -> SloLatencyModel:
    """The `slo` policy's latency model from the profiles `prescient profile` would write for
    `preset` (its default grids), as a deployment would load them."""
    tokens, batches, tprs = default_grids(get_preset(preset), max_num_batched_tokens)
    ttft, tpot = profile_engine(preset, tokens_grid=tokens, batch_grid=batches, tpr_grid=tprs,
                                max_num_batched_tokens=max_num_batched_tokens)
    return SloLatencyModel.from_profiles(msgspec.convert(ttft, TtftProfile),
                                         msgspec.convert(tpot, TpotProfile))
