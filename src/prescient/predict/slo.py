"""SLO latency model: profiled TTFT and TPOT, interpolated, and upstream's chunked-prefill rule.

Profiles (reference §5.1) are two JSON files of offline measurements in milliseconds, of which
only the p50s are used:

- TTFT: ``tokens_num -> p50``, the time to prefill one chunk of that many tokens;
- TPOT: ``(batch_size, tokens_per_request) -> p50``, the time of one decode step of that many
  requests whose contexts average that many tokens. The grid must be rectangular.

`InterpolationPredictor` reads a profile exactly as upstream does inside the grid: bilinear in
the enclosing cell, linear along a degenerate axis, and ``(0, 0)`` is 0. Upstream answers a
query outside the grid with an error, which the SLO filter reads as +inf and rejects (reference
§11 item 8). Here such a query is answered by a least-squares trend of the profile, anchored at
the nearest grid point so that the prediction is continuous at the edge::

    predict(q) = grid(clamp(q)) + trend(q) - trend(clamp(q))

A query beyond the grid's upper edge is never cheaper than the edge, and one below its lower
edge never dearer than the edge nor below 0. The trends:

- TTFT: ``c2 * tokens² + c1 * tokens + c0``. The GEMMs are linear in the chunk and causal
  attention quadratic. It falls back to a line with fewer than 3 points, or when the quadratic
  is concave (that would make long chunks cheaper per token outside the data). With one point
  it is constant.
- TPOT: ``c0 + c1 * batch + c2 * batch * tokens_per_request``: a fixed cost per step (weight
  streaming), a cost per sequence, and a cost per KV token read (batch x context). It is the
  shape of the engine's own step-time model, and it is linear in its coefficients.

`SloLatencyModel` holds both predictors and computes upstream's ``predicted_ttft`` and
``predicted_tpot`` for every instance at once (reference §5.2). Pure: parsing starts from bytes
already read, and time comes in as ``now``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Protocol, TypeVar

import msgspec
import numpy as np

from prescient.errors import ConfigError

if TYPE_CHECKING:  # the policy package imports this module's users: no cycle at run time
    from prescient.policy.state import ClusterState

MIN_TOKENS_PER_REQUEST = 8.0  # upstream's floor on the TPOT query's tokens per request
_Ms = Annotated[float, msgspec.Meta(ge=0)]  # a latency statistic, milliseconds


class ProfileMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """Where a profile came from. Not used for prediction."""

    model: str = ""
    timestamp: int | float | str = 0
    description: str = ""


class _LatencyStats(msgspec.Struct, frozen=True, kw_only=True):
    """The statistics of one grid point, ms. Only `p50` is used; the rest are type-checked."""

    mean: _Ms = 0.0
    std: _Ms = 0.0
    min: _Ms = 0.0
    max: _Ms = 0.0
    p50: _Ms
    p95: _Ms = 0.0
    p99: _Ms = 0.0
    raw_data: tuple[_Ms, ...] = ()  # every sample, ms


class TtftResult(_LatencyStats, frozen=True, kw_only=True):
    """One prefill size."""

    tokens_num: Annotated[int, msgspec.Meta(ge=1)]  # tokens in the chunk


class TpotResult(_LatencyStats, frozen=True, kw_only=True):
    """One decode batch shape."""

    batch_size: Annotated[int, msgspec.Meta(ge=1)]  # decoding requests
    tokens_per_request: Annotated[float, msgspec.Meta(gt=0)]  # mean context, tokens


class TtftProfile(msgspec.Struct, frozen=True, kw_only=True):
    """The TTFT file (``--ttft-profiling-data-path``). Unknown keys are ignored, as upstream."""

    metadata: ProfileMetadata = ProfileMetadata()
    results: Annotated[tuple[TtftResult, ...], msgspec.Meta(min_length=1)]


class TpotProfile(msgspec.Struct, frozen=True, kw_only=True):
    """The TPOT file (``--tpot-profiling-data-path``). Unknown keys are ignored, as upstream."""

    metadata: ProfileMetadata = ProfileMetadata()
    results: Annotated[tuple[TpotResult, ...], msgspec.Meta(min_length=1)]


def load_ttft_profile(data: bytes, source: str) -> TtftProfile:
    """Decode and check a TTFT profile.

    Raises:
        ConfigError: naming `source` and the field at fault, e.g.
            ``ttft.json: results[3].p50: expected a number, got a string``.
    """
    profile = _decode(data, TtftProfile, source)
    _check_unique([(r.tokens_num,) for r in profile.results], ("tokens_num",), source)
    return profile


def load_tpot_profile(data: bytes, source: str) -> TpotProfile:
    """Decode and check a TPOT profile, whose grid must be rectangular.

    Raises:
        ConfigError: naming `source` and the field at fault, or the missing grid corner.
    """
    profile = _decode(data, TpotProfile, source)
    keys = [(r.batch_size, r.tokens_per_request) for r in profile.results]
    _check_unique(keys, ("batch_size", "tokens_per_request"), source)
    present = set(keys)
    for batch in sorted({k[0] for k in keys}):
        for tpr in sorted({k[1] for k in keys}):
            if (batch, tpr) not in present:
                raise ConfigError(
                    f"{source}: results: the grid is not rectangular: no row for "
                    f"batch_size={batch}, tokens_per_request={tpr:g} (every batch_size x "
                    "tokens_per_request pair must be profiled)")
    return profile


_P = TypeVar("_P", TtftProfile, TpotProfile)
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "array": "a list",
          "object": "an object", "bool": "a boolean", "null": "null",
          "int | float | str": "a number or a string"}


def _decode(data: bytes, kind: type[_P], source: str) -> _P:
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as e:
        match = _AT.match(str(e))
        assert match is not None  # the pattern matches any text
        text = re.sub(r"`([^`]*)`", lambda m: _WORDS.get(m[1], repr(m[1])), match["msg"])
        text = text.replace("Object missing", "missing")
        text = text[:1].lower() + text[1:]
        path = (match["path"] or "").lstrip(".")
        raise ConfigError(f"{source}: {path}: {text}" if path else f"{source}: {text}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: not valid JSON: {e}") from None


def _check_unique(keys: Sequence[tuple[float, ...]], names: tuple[str, ...], source: str) -> None:
    seen: dict[tuple[float, ...], int] = {}
    for i, key in enumerate(keys):
        if key in seen:
            what = ", ".join(f"{n}={v:g}" for n, v in zip(names, key, strict=True))
            raise ConfigError(f"{source}: results[{i}]: {what} repeats results[{seen[key]}]")
        seen[key] = i


class Trend(Protocol):
    """A smooth model of a profile's p50 (ms) used outside its grid."""

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...


class QuadraticTrend(msgspec.Struct, frozen=True):
    """TTFT trend ``c2 * tokens² + c1 * tokens + c0`` in ms; the second axis is ignored."""

    c2: float  # ms per token²
    c1: float  # ms per token
    c0: float  # ms

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (self.c2 * a + self.c1) * a + self.c0

    @classmethod
    def fit(cls, tokens: Sequence[float], ms: Sequence[float]) -> QuadraticTrend:
        """Least squares: quadratic with >= 3 points unless concave, else linear, else constant."""
        x, y = np.asarray(tokens, float), np.asarray(ms, float)
        if len(x) == 1:
            return cls(0.0, 0.0, float(y[0]))
        scale = float(np.max(np.abs(x))) or 1.0  # fit on x / scale: well conditioned
        u = x / scale
        if len(x) >= 3:
            c = np.linalg.lstsq(np.column_stack([u * u, u, np.ones_like(u)]), y, rcond=None)[0]
            if c[0] >= 0:
                return cls(float(c[0]) / scale**2, float(c[1]) / scale, float(c[2]))
        c = np.linalg.lstsq(np.column_stack([u, np.ones_like(u)]), y, rcond=None)[0]
        return cls(0.0, float(c[0]) / scale, float(c[1]))


class DecodeTrend(msgspec.Struct, frozen=True):
    """TPOT trend ``c0 + c1 * batch + c2 * batch * tokens_per_request`` in ms."""

    c0: float  # ms per step
    c1: float  # ms per decoding request
    c2: float  # ms per KV token read

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.c0 + a * (self.c1 + self.c2 * b)

    @classmethod
    def fit(cls, batch: Sequence[float], tpr: Sequence[float], ms: Sequence[float]
            ) -> DecodeTrend:
        """Least squares over every grid point (minimum-norm when the grid is degenerate)."""
        n, t, y = np.asarray(batch, float), np.asarray(tpr, float), np.asarray(ms, float)
        design = np.column_stack([np.ones_like(n), n, n * t])
        scale = np.max(np.abs(design), axis=0)
        scale[scale == 0] = 1.0
        c = np.linalg.lstsq(design / scale, y, rcond=None)[0] / scale
        return cls(float(c[0]), float(c[1]), float(c[2]))


class InterpolationPredictor:
    """p50 latency (ms) on a rectangular grid over ``(a, b)``, with a trend outside it.

    TTFT grids are ``(tokens_num, 0)``; TPOT grids are ``(batch_size, tokens_per_request)``.
    """

    __slots__ = ("_a", "_b", "_values", "trend")

    def __init__(self, a_axis: Sequence[float], b_axis: Sequence[float],
                 values: np.ndarray, trend: Trend) -> None:
        self._a = np.asarray(a_axis, float)
        self._b = np.asarray(b_axis, float)
        self._values = np.asarray(values, float)  # [i, j] at (a_axis[i], b_axis[j]), ms
        self.trend = trend
        if self._a.ndim != 1 or self._b.ndim != 1 or not self._a.size or not self._b.size:
            raise ValueError("grid axes must be non-empty 1-D sequences")
        if np.any(np.diff(self._a) <= 0) or np.any(np.diff(self._b) <= 0):
            raise ValueError("grid axes must be strictly ascending")
        if self._values.shape != (self._a.size, self._b.size):
            raise ValueError(f"grid values have shape {self._values.shape}, "
                             f"expected {(self._a.size, self._b.size)}")
        if not np.all(np.isfinite(self._values)):
            raise ValueError("grid values must be finite (is every grid corner profiled?)")

    @classmethod
    def from_ttft(cls, profile: TtftProfile) -> InterpolationPredictor:
        """The 1-D TTFT predictor: ``(tokens_num, 0) -> p50``."""
        rows = sorted(profile.results, key=lambda r: r.tokens_num)
        tokens, ms = [r.tokens_num for r in rows], [r.p50 for r in rows]
        return cls(tokens, [0.0], np.array(ms)[:, None], QuadraticTrend.fit(tokens, ms))

    @classmethod
    def from_tpot(cls, profile: TpotProfile) -> InterpolationPredictor:
        """The 2-D TPOT predictor: ``(batch_size, tokens_per_request) -> p50``."""
        rows = profile.results
        batches = sorted({r.batch_size for r in rows})
        tprs = sorted({r.tokens_per_request for r in rows})
        bi, ti = {b: i for i, b in enumerate(batches)}, {t: j for j, t in enumerate(tprs)}
        grid = np.full((len(batches), len(tprs)), np.nan)
        for r in rows:
            grid[bi[r.batch_size], ti[r.tokens_per_request]] = r.p50
        trend = DecodeTrend.fit([r.batch_size for r in rows],
                                [r.tokens_per_request for r in rows], [r.p50 for r in rows])
        return cls(batches, tprs, grid, trend)

    def predict(self, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
        """Interpolate inside the grid, follow the anchored trend outside; +inf for NaN/inf."""
        a, b, finite = self._queries(a, b)
        ac = np.clip(a, self._a[0], self._a[-1])
        bc = np.clip(b, self._b[0], self._b[-1])
        edge = self._grid(ac, bc)
        with np.errstate(all="ignore"):
            shifted = edge + self.trend(a, b) - self.trend(ac, bc)
        above = (a > ac) | (b > bc)
        below = (a < ac) | (b < bc)
        low = np.where(above & ~below, edge, 0.0)
        high = np.where(below & ~above, edge, np.inf)
        return self._finish(np.where(above | below, np.clip(shifted, low, high), edge),
                            a, b, finite)

    def interpolate(self, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
        """Upstream's ``Predict``: +inf anywhere outside the grid."""
        a, b, finite = self._queries(a, b)
        inside = ((a >= self._a[0]) & (a <= self._a[-1])
                  & (b >= self._b[0]) & (b <= self._b[-1]))
        ac = np.clip(a, self._a[0], self._a[-1])
        bc = np.clip(b, self._b[0], self._b[-1])
        return self._finish(np.where(inside, self._grid(ac, bc), np.inf), a, b, finite)

    def predict_one(self, a: float, b: float = 0.0) -> float:
        """`predict` for one query."""
        return float(self.predict(a, b))

    def _queries(self, a: np.ndarray | float, b: np.ndarray | float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qa, qb = np.broadcast_arrays(np.asarray(a, float), np.asarray(b, float))
        finite = np.isfinite(qa) & np.isfinite(qb)
        return np.where(finite, qa, self._a[0]), np.where(finite, qb, self._b[0]), finite

    def _grid(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Bilinear interpolation of queries already inside the grid."""
        i1, i2, wa = _bracket(self._a, a)
        j1, j2, wb = _bracket(self._b, b)
        z = self._values
        return ((1 - wa) * (1 - wb) * z[i1, j1] + (1 - wa) * wb * z[i1, j2]
                + wa * (1 - wb) * z[i2, j1] + wa * wb * z[i2, j2])

    @staticmethod
    def _finish(out: np.ndarray, a: np.ndarray, b: np.ndarray, finite: np.ndarray
                ) -> np.ndarray:
        out = np.where((a == 0) & (b == 0), 0.0, out)
        return np.where(finite & ~np.isnan(out), out, np.inf)

    def __repr__(self) -> str:
        return (f"InterpolationPredictor({self._a.size}x{self._b.size} grid, "
                f"trend={self.trend!r})")


def _bracket(axis: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the largest grid value <= x and the smallest >= x, and x's weight between."""
    lo = np.searchsorted(axis, x, side="right") - 1
    hi = np.searchsorted(axis, x, side="left")
    span = axis[hi] - axis[lo]
    weight = np.where(span > 0, (x - axis[lo]) / np.where(span > 0, span, 1.0), 0.0)
    return lo, hi, weight


class SloLatencyModel:
    """Upstream's `LatencyPredictor`: TTFT and TPOT predictions for every instance at once.

    Every method takes one value per instance row (or scalars that broadcast) and returns ms.
    A prediction that cannot be made is +inf for that instance; nothing raises mid-dispatch.
    """

    __slots__ = ("_full_chunk_ms", "_max_batched", "_metadata", "tpot", "ttft")

    def __init__(self, ttft: InterpolationPredictor, tpot: InterpolationPredictor) -> None:
        self.ttft = ttft
        self.tpot = tpot
        self._metadata: object = None  # the `ClusterState.metadata` list last seen
        self._max_batched = np.zeros(0)  # its max_num_batched_tokens column
        self._full_chunk_ms = np.zeros(0)  # ttft(max_num_batched_tokens) per row

    @classmethod
    def from_profiles(cls, ttft: TtftProfile, tpot: TpotProfile) -> SloLatencyModel:
        return cls(InterpolationPredictor.from_ttft(ttft), InterpolationPredictor.from_tpot(tpot))

    def predict_tpot(self, reqs: np.ndarray | float, tokens: np.ndarray | float) -> np.ndarray:
        """One decode step of `reqs` requests holding `tokens` context tokens in all.

        0 where there is nothing to decode; the query's tokens per request is floored at 8.
        """
        r, t = np.broadcast_arrays(np.asarray(reqs, float), np.asarray(tokens, float))
        idle = (r <= 0) | (t <= 0)
        safe = np.where(idle, 1.0, r)
        tpr = np.maximum(np.where(idle, 0.0, t) / safe, MIN_TOKENS_PER_REQUEST)
        return np.where(idle, 0.0, self.tpot.predict(safe, tpr))

    def predict_ttft_by_chunks(
        self, prefill_tokens: np.ndarray | float, decode_reqs: np.ndarray | float,
        decode_tokens: np.ndarray | float, max_batched: np.ndarray | float,
    ) -> np.ndarray:
        """Time to prefill `prefill_tokens` in chunks of at most `max_batched` tokens.

        Each chunk costs its TTFT plus one decode step of the instance's decode batch, so
        with ``n = tokens // max_batched`` full chunks and ``r`` tokens left::

            n * ttft(max_batched) + ttft(r) + (n + (r > 0)) * tpot(decode_reqs, decode_tokens)

        Raises:
            ValueError: a `max_batched` <= 0 (upstream's loop never ends there).
        """
        p, r, t, mb = np.broadcast_arrays(*(np.asarray(x, float) for x in (
            prefill_tokens, decode_reqs, decode_tokens, max_batched)))
        if np.any(~(mb > 0)):
            raise ValueError("max_batched must be > 0 (a chunk budget of 0 never finishes)")
        return self._chunked(p, self.predict_tpot(r, t), mb, self.ttft.predict(mb, 0.0))

    def predicted_ttft_ms(
        self, state: ClusterState, request_prompt_tokens: int, now: float,
        all_prefills: np.ndarray, decode_batch_size: np.ndarray, all_decodes_tokens: np.ndarray,
        step_ms: np.ndarray | None = None,
    ) -> np.ndarray:
        """Upstream's ``predicted_ttft`` with the elapsed-time correction (reference §5.2).

        ``E`` is the time the prefill work in the instance's last status takes. Once more than
        ``E`` has passed since that status, that work is assumed done and only the requests
        dispatched since (the local account) queue ahead of this one; before that, the whole
        queue does, less the time already spent on it::

            elapsed > E:  ttft(LA inflight prefill tokens + prompt)
            otherwise:    ttft(all_prefills_tokens_num + prompt) - elapsed

        Elapsed time is clamped at 0 (a status stamped after `now`). An instance whose metadata
        has no chunk budget (``max_num_batched_tokens`` <= 0) gets +inf.

        Args:
            state: the cluster columns; status timestamps are ms, `now` is seconds.
            request_prompt_tokens: the new request's prompt length.
            all_prefills, decode_batch_size, all_decodes_tokens: those metrics' columns.
        """
        st = self.max_batched_tokens(state)
        ok = st > 0
        mb = np.where(ok, st, 1.0)
        in_status = (state.s("num_uncomputed_tokens_all_waiting_prefills")
                     + state.s("num_uncomputed_tokens_scheduler_running_prefills"))
        inflight = state.a("num_uncomputed_tokens_inflight_dispatch_prefill_requests")
        # the three queues priced in one pass: what the status showed, what was dispatched
        # since (plus this request), and everything (plus this request)
        queues = np.stack([in_status, inflight + request_prompt_tokens,
                           all_prefills + request_prompt_tokens])
        step = step_ms if step_ms is not None else self.predict_tpot(
            decode_batch_size, all_decodes_tokens)
        busy_ms, caught_up, behind = self._chunked(queues, step, mb, self._full_chunk_ms)
        elapsed_ms = np.maximum(now * 1000.0 - state.s("timestamp_ms"), 0.0)
        ttft = np.where(elapsed_ms > busy_ms, caught_up, behind - elapsed_ms)
        return np.where(ok & ~np.isnan(ttft), ttft, np.inf)

    def predicted_ms(
        self, state: ClusterState, request_prompt_tokens: int, now: float,
        all_prefills: np.ndarray, decode_batch_size: np.ndarray, all_decodes_tokens: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(`predicted_ttft_ms`, `predicted_tpot_ms`), sharing one TPOT lookup between them."""
        steps = self.predict_tpot(
            np.stack([decode_batch_size, decode_batch_size + 1]),
            np.stack([all_decodes_tokens, all_decodes_tokens + request_prompt_tokens]))
        ttft = self.predicted_ttft_ms(state, request_prompt_tokens, now, all_prefills,
                                      decode_batch_size, all_decodes_tokens, steps[0])
        return ttft, steps[1]

    def predicted_tpot_ms(self, request_prompt_tokens: int, decode_batch_size: np.ndarray,
                          all_decodes_tokens: np.ndarray) -> np.ndarray:
        """Upstream's ``predicted_tpot``: the decode step once the request joins the batch."""
        return self.predict_tpot(decode_batch_size + 1, all_decodes_tokens + request_prompt_tokens)

    def max_batched_tokens(self, state: ClusterState) -> np.ndarray:
        """Each row's ``metadata.max_num_batched_tokens``, kept until the instance set changes."""
        if state.metadata is not self._metadata:
            self._metadata = state.metadata
            self._max_batched = np.array(
                [m.max_num_batched_tokens for m in state.metadata], float)
            budgets = np.where(self._max_batched > 0, self._max_batched, 1.0)
            self._full_chunk_ms = self.ttft.predict(budgets, 0.0)
        return self._max_batched

    def _chunked(self, tokens: np.ndarray, step_ms: np.ndarray, max_batched: np.ndarray,
                 full_chunk_ms: np.ndarray) -> np.ndarray:
        """Chunked prefill time of `tokens` (any leading shape over the instance axis)."""
        with np.errstate(all="ignore"):
            tokens = np.maximum(tokens, 0.0)
            num_full = np.floor(tokens / max_batched)
            rest = tokens - num_full * max_batched
            num_chunks = num_full + (rest > 0)
            last = self.ttft.predict(rest.ravel(), 0.0).reshape(rest.shape)
            total = (np.where(num_full > 0, num_full * full_chunk_ms, 0.0)
                     + np.where(rest > 0, last, 0.0)
                     + np.where(num_chunks > 0, num_chunks * step_ms, 0.0))
        return np.where(np.isnan(tokens) | np.isnan(total), np.inf, total)

    def __repr__(self) -> str:
        return f"SloLatencyModel(ttft={self.ttft!r}, tpot={self.tpot!r})"
