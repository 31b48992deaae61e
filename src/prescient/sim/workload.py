"""Synthetic workloads, and transformations that apply to any list of requests.

Experiments need workloads whose knobs are explicit (arrival rate, burstiness, length
distributions, multi-turn prefix sharing) so that a policy comparison can sweep one knob at a
time. Everything here is a pure function of its arguments and a seed: randomness comes only from
`numpy.random.default_rng(seed)`, never from global state or the clock, so a workload can be
regenerated exactly from the parameters recorded next to a result.

Each generator draws arrivals and lengths from separate child streams of its seed. Sampling is
sequential within a stream, so a longer workload with the same seed starts with the same
requests as a shorter one. Arrival times are cumulative inter-arrival gaps: the first request
arrives at the first sampled gap, not at 0 (`rebase` moves it to 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np

from prescient.errors import ConfigError
from prescient.model.request import Request

DEFAULT_MAX_LEN = 131072
_FORMS = (
    "accepted forms: 'N' or 'fixed:N', 'uniform:LOW:HIGH', "
    "'lognormal:mean=M,median=MED[,min=A,max=B]'"
)
_CHUNK_SLACK = 64  # duration-bounded arrivals are drawn in chunks of rate*duration + this


class LengthSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A distribution of token counts (or turn counts). Build with the class methods.

    Lognormal samples are rounded to the nearest integer, then clipped to `[min, max]`, so
    `mean` and `median` describe the distribution before rounding and clipping.
    """

    kind: Literal["fixed", "uniform", "lognormal"]
    value: int = 0  # fixed
    low: int = 0  # uniform, inclusive
    high: int = 0  # uniform, inclusive
    mean: float = 0.0  # lognormal; mean >= median > 0
    median: float = 0.0  # lognormal
    min: int = 1  # lognormal clip
    max: int = DEFAULT_MAX_LEN  # lognormal clip

    def __post_init__(self) -> None:
        if self.kind == "fixed":
            ok, need = self.value >= 1, f"value >= 1, got {self.value}"
        elif self.kind == "uniform":
            ok, need = 1 <= self.low <= self.high, f"1 <= low <= high, got {self.low}, {self.high}"
        elif self.kind == "lognormal":
            ok = math.isfinite(self.mean) and self.mean >= self.median > 0
            ok = ok and 1 <= self.min <= self.max
            need = (
                f"mean >= median > 0 and 1 <= min <= max, got mean={self.mean} "
                f"median={self.median} min={self.min} max={self.max}"
            )
        else:
            ok, need = False, f"a known kind, got {self.kind!r}; {_FORMS}"
        if not ok:
            raise ConfigError(f"{self.kind} length spec needs {need}")

    @classmethod
    def fixed(cls, value: int) -> LengthSpec:
        """Every sample is `value`."""
        return cls(kind="fixed", value=value)

    @classmethod
    def uniform(cls, low: int, high: int) -> LengthSpec:
        """Integers drawn uniformly from `[low, high]`, both inclusive."""
        return cls(kind="uniform", low=low, high=high)

    @classmethod
    def lognormal(
        cls, *, mean: float, median: float, min: int = 1, max: int = DEFAULT_MAX_LEN
    ) -> LengthSpec:
        """A lognormal with the given mean and median, rounded and clipped to `[min, max]`."""
        return cls(kind="lognormal", mean=mean, median=median, min=min, max=max)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Draw `size` integers >= 1 from `rng` (advanced in place) as an int64 array."""
        if self.kind == "fixed":
            return np.full(size, self.value, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high, size=size, endpoint=True, dtype=np.int64)
        mu = math.log(self.median)
        sigma = math.sqrt(2.0 * math.log(self.mean / self.median))
        raw = rng.lognormal(mu, sigma, size=size)
        return np.clip(np.rint(raw), self.min, self.max).astype(np.int64)

    def __str__(self) -> str:
        """The CLI form that `parse_length_spec` reads back."""
        if self.kind == "fixed":
            return str(self.value)
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        text = f"lognormal:mean={self.mean:.15g},median={self.median:.15g}"
        if self.min != 1 or self.max != DEFAULT_MAX_LEN:
            text += f",min={self.min},max={self.max}"
        return text


def parse_length_spec(text: str) -> LengthSpec:
    """Parse a CLI length spec: `"512"`, `"uniform:100:2000"`, `"lognormal:mean=1155,median=1020"`.

    Args:
        text: The spec. `"fixed:512"` is accepted too; lognormal takes optional `min=` and
            `max=` keys.

    Raises:
        ConfigError: The text is not one of the accepted forms, or its numbers are invalid; the
            message quotes the text and lists the forms.
    """
    kind, sep, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    try:
        if not sep:
            return LengthSpec.fixed(_parse_int(kind))
        if kind == "fixed":
            return LengthSpec.fixed(_parse_int(rest))
        if kind == "uniform":
            parts = rest.split(":")
            if len(parts) != 2:
                raise ConfigError("uniform takes exactly LOW:HIGH")
            return LengthSpec.uniform(_parse_int(parts[0]), _parse_int(parts[1]))
        if kind == "lognormal":
            return _parse_lognormal(rest)
        raise ConfigError(f"unknown kind {kind!r}")
    except ConfigError as exc:
        raise ConfigError(f"bad length spec {text!r}: {exc}; {_FORMS}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{text.strip()!r} is not an integer") from None


def _parse_lognormal(rest: str) -> LengthSpec:
    keys: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("mean", "median", "min", "max"):
            raise ConfigError(f"expected mean=, median=, min= or max=, got {item.strip()!r}")
        if key in keys:
            raise ConfigError(f"{key}= given twice")
        keys[key] = value.strip()
    if "mean" not in keys or "median" not in keys:
        raise ConfigError("lognormal needs both mean= and median=")
    try:
        mean, median = float(keys["mean"]), float(keys["median"])
    except ValueError:
        raise ConfigError("mean and median must be numbers") from None
    return LengthSpec.lognormal(
        mean=mean,
        median=median,
        min=_parse_int(keys.get("min", "1")),
        max=_parse_int(keys.get("max", str(DEFAULT_MAX_LEN))),
    )


def sample_interarrivals(
    rng: np.random.Generator, size: int, *, rate: float, arrival: str = "poisson", cv: float = 1.0
) -> np.ndarray:
    """Draw inter-arrival gaps in seconds.

    Args:
        rng: The generator to draw from.
        size: How many gaps.
        rate: Mean arrivals per second (> 0).
        arrival: "poisson" (exponential gaps) or "gamma" (Gamma gaps with mean `1 / rate` and
            coefficient of variation `cv`; cv = 1 is Poisson, cv > 1 is burstier).
        cv: Coefficient of variation of the gamma gaps (> 0); ignored for poisson.

    Returns:
        A float64 array of `size` gaps.

    Raises:
        ConfigError: A parameter is out of range or `arrival` is unknown.
    """
    _check_arrival(rate, arrival, cv)
    if arrival == "gamma":
        shape = 1.0 / (cv * cv)
        return rng.gamma(shape, 1.0 / (rate * shape), size=size)
    return rng.exponential(1.0 / rate, size=size)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_arrival(rate: float, arrival: str, cv: float) -> None:
    _require(0 < rate < math.inf, f"arrival rate must be > 0, got {rate}")
    known = ("poisson", "gamma")
    _require(arrival in known, f"unknown arrival process {arrival!r}; known: {known}")
    _require(arrival != "gamma" or 0 < cv < math.inf, f"gamma cv must be > 0, got {cv}")


def _arrival_times(
    rng: np.random.Generator,
    rate: float,
    n: int | None,
    duration: float | None,
    kind: str,
    cv: float,
) -> np.ndarray:
    """Cumulative arrival times, at most `n` of them and all before `duration`."""
    _check_arrival(rate, kind, cv)
    if duration is None:
        assert n is not None
        return np.cumsum(sample_interarrivals(rng, n, rate=rate, arrival=kind, cv=cv))
    limit = math.inf if n is None else n
    chunk = int(min(rate * duration + _CHUNK_SLACK, limit))
    parts: list[np.ndarray] = []
    count, last = 0, 0.0
    while last < duration and count < limit:
        part = last + np.cumsum(sample_interarrivals(rng, chunk, rate=rate, arrival=kind, cv=cv))
        parts.append(part)
        count, last = count + chunk, float(part[-1])
    times = np.concatenate(parts) if parts else np.empty(0)
    return times[times < duration][:n]


def synthetic_workload(
    *,
    rate: float,
    num_requests: int | None = None,
    duration: float | None = None,
    arrival: str = "poisson",
    cv: float = 1.0,
    prompt: LengthSpec,
    output: LengthSpec,
    seed: int,
) -> list[Request]:
    """Independent single-turn requests with a renewal arrival process.

    The first request arrives after one sampled gap (not at 0). Prompt and output lengths are
    drawn independently of each other and of the arrivals.

    Args:
        rate: Mean requests per second.
        num_requests: Stop after this many requests.
        duration: Keep only arrivals strictly before this many seconds. With `num_requests`
            too, whichever limit is hit first applies.
        arrival: "poisson" or "gamma".
        cv: Coefficient of variation of gamma inter-arrivals.
        prompt: Prompt length distribution.
        output: Output length distribution.
        seed: Seed of `numpy.random.default_rng`.

    Returns:
        Requests in arrival order, ids `req-000000`, `req-000001`, ...

    Raises:
        ConfigError: Neither limit is given, or a parameter is out of range.
    """
    _require(num_requests is not None or duration is not None, "need num_requests or duration")
    _require(num_requests is None or num_requests >= 0, f"bad num_requests {num_requests}")
    _require(duration is None or 0 <= duration < math.inf, f"bad duration {duration}")
    arrival_rng, prompt_rng, output_rng = np.random.default_rng(seed).spawn(3)
    times = _arrival_times(arrival_rng, rate, num_requests, duration, arrival, cv)
    n = len(times)
    prompts = prompt.sample(prompt_rng, n).tolist()
    outputs = output.sample(output_rng, n).tolist()
    return [
        Request(request_id=f"req-{i:06d}", prompt_len=p, output_len=o, arrival_time=t)
        for i, (t, p, o) in enumerate(zip(times.tolist(), prompts, outputs, strict=True))
    ]


def session_workload(
    *,
    num_sessions: int,
    turns: LengthSpec,
    session_rate: float,
    think_time: float,
    first_prompt: LengthSpec,
    turn_prompt: LengthSpec,
    output: LengthSpec,
    seed: int,
    prefix_block_size: int = 16,
) -> list[Request]:
    """Multi-turn chat sessions whose prompts grow on a shared prefix.

    Sessions start as a Poisson process (the first after one sampled gap). Turn k+1 arrives an
    exponential `think_time` (mean, seconds) after turn k arrives, and its prompt is turn k's
    prompt + turn k's output + `turn_prompt` new tokens. Prefix sharing is expressed with
    `Request.prefix_block_ids`: each request's ids cover its prompt and output,
    `ceil((prompt_len + output_len) / prefix_block_size)` of them. The next turn of the session
    reuses the ids of every full block of that history; the trailing partial block (whose
    content the new user tokens change) and everything after it get fresh ids. Ids come from a
    single counter, so different sessions never share one.

    Args:
        num_sessions: How many sessions.
        turns: Distribution of turns per session.
        session_rate: New sessions per second.
        think_time: Mean seconds between one turn's arrival and the next's (>= 0).
        first_prompt: Prompt length of a session's first turn.
        turn_prompt: New user tokens appended by each later turn.
        output: Output length of every turn.
        seed: Seed of `numpy.random.default_rng`.
        prefix_block_size: Tokens per prefix block id.

    Returns:
        Requests sorted by arrival time, ids `s00000-t000` (session, turn; both 0-based),
        `session_id` `s00000`.

    Raises:
        ConfigError: A parameter is out of range.
    """
    _require(num_sessions >= 0, f"num_sessions must be >= 0, got {num_sessions}")
    _require(0 <= think_time < math.inf, f"think_time must be >= 0, got {think_time}")
    _require(prefix_block_size >= 1, f"prefix_block_size must be >= 1, got {prefix_block_size}")
    start_rng, session_rng = np.random.default_rng(seed).spawn(2)
    starts = np.cumsum(sample_interarrivals(start_rng, num_sessions, rate=session_rate)).tolist()
    requests: list[Request] = []
    next_block = 0
    for s, start in enumerate(starts):
        n_turns = int(turns.sample(session_rng, 1)[0])
        first = first_prompt.sample(session_rng, 1).tolist()
        added = first + turn_prompt.sample(session_rng, n_turns - 1).tolist()  # new tokens per turn
        outputs = output.sample(session_rng, n_turns).tolist()
        gaps = session_rng.exponential(think_time, size=n_turns).tolist()
        arrival = start
        history = 0  # tokens of the previous turn's prompt + output
        blocks: list[int] = []
        for k in range(n_turns):
            prompt_len = history + added[k]
            total = prompt_len + outputs[k]
            del blocks[history // prefix_block_size :]  # keep only full blocks of the history
            fresh = -(-total // prefix_block_size) - len(blocks)
            blocks.extend(range(next_block, next_block + fresh))
            next_block += fresh
            requests.append(
                Request(
                    request_id=f"s{s:05d}-t{k:03d}",
                    prompt_len=prompt_len,
                    output_len=outputs[k],
                    arrival_time=arrival,
                    session_id=f"s{s:05d}",
                    prefix_block_ids=tuple(blocks),
                    prefix_block_size=prefix_block_size,
                )
            )
            history = total
            arrival += gaps[k]
    requests.sort(key=lambda r: (r.arrival_time, r.request_id))
    return requests


def scale_rate(requests: Sequence[Request], factor: float) -> list[Request]:
    """Compress time by `factor`: arrival times are divided by it, so the rate is multiplied.

    Raises:
        ConfigError: `factor` is not a finite number > 0.
    """
    _require(0 < factor < math.inf, f"rate scale factor must be > 0, got {factor}")
    return [msgspec.structs.replace(r, arrival_time=r.arrival_time / factor) for r in requests]


def truncate(
    requests: Sequence[Request], *, duration: float | None = None, num_requests: int | None = None
) -> list[Request]:
    """Keep arrivals less than `duration` seconds after the first arrival, then the first N.

    Order is preserved; "first N" means the first N of the list (arrival order for the lists
    this module and `traces` produce). With neither limit the result is a copy.

    Raises:
        ConfigError: A limit is negative.
    """
    _require(duration is None or duration >= 0, f"bad truncate duration {duration}")
    _require(num_requests is None or num_requests >= 0, f"bad num_requests {num_requests}")
    kept = list(requests)
    if duration is not None and kept:
        cutoff = min(r.arrival_time for r in kept) + duration
        kept = [r for r in kept if r.arrival_time < cutoff]
    if num_requests is not None:
        kept = kept[:num_requests]
    return kept


def rebase(requests: Sequence[Request]) -> list[Request]:
    """Shift arrival times so that the earliest is 0.0."""
    if not requests:
        return []
    first = min(r.arrival_time for r in requests)
    return [msgspec.structs.replace(r, arrival_time=r.arrival_time - first) for r in requests]
