"""Offline latency profiles of a simulated engine, in upstream Llumnix's JSON formats (§5.1).

SLO-aware scheduling reads two profiles: TTFT by prefill chunk size, and TPOT by decode batch
shape. Upstream measures them on a GPU; `profile_engine` measures a fresh `SimEngine` built from
a preset the way the cluster simulator builds its engines, so a simulated cluster can be
scheduled with a profile of its own engines.

- TTFT, per ``tokens_num``: a lone prompt of that many tokens (output 1) on an idle engine,
  from arrival to its first token. The repeats vary the prompt length symmetrically by up to
  `jitter` (seeded), so ``std`` shows the local slope and ``p50`` is the nominal length's time
  for an odd number of repeats. Up to ``max_num_batched_tokens`` this is one chunk.
- TPOT, per ``(batch_size, tokens_per_request)``: that many requests prefilled together, then
  `repeats` decode steps timed one by one, their contexts centred on ``tokens_per_request``.
  Every batch must fit in the preset's KV cache (so no step is slowed by preemption).

This module is the I/O edge for profiles: `write_profiles` and `read_slo_model` touch files,
and everything else is pure.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from prescient.config.presets import Preset, get_preset
from prescient.engine import EngineConfig, SimEngine
from prescient.errors import ConfigError
from prescient.model import Request
from prescient.predict.slo import (
    MIN_TOKENS_PER_REQUEST,
    ProfileMetadata,
    SloLatencyModel,
    TpotProfile,
    TpotResult,
    TtftProfile,
    TtftResult,
    load_tpot_profile,
    load_ttft_profile,
)

DEFAULT_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)  # capped at the budget
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_MAX_TOKENS_PER_REQUEST = 2048  # tokens; also capped by what the KV cache holds
TTFT_FILE = "ttft.json"
TPOT_FILE = "tpot.json"


def default_grids(preset: Preset, max_num_batched_tokens: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Token, batch-size and tokens-per-request grids that cover what the scheduler asks.

    Chunks from 16 tokens up to the chunk budget (itself included); batches of 1..256 within
    the budget; tokens per request from 8 (upstream's floor) doubling while the largest batch
    still fits in the KV cache, up to 2048. The model extrapolates beyond.
    """
    tokens = tuple(sorted({t for t in DEFAULT_TOKENS if t < max_num_batched_tokens}
                          | {max_num_batched_tokens}))
    batches = tuple(b for b in DEFAULT_BATCH_SIZES if b <= max_num_batched_tokens) or (1,)
    tprs = [int(MIN_TOKENS_PER_REQUEST)]
    while (tprs[-1] * 2 <= DEFAULT_MAX_TOKENS_PER_REQUEST
           and _fits(preset, batches[-1], tprs[-1] * 2, repeats=16)):
        tprs.append(tprs[-1] * 2)
    return tokens, batches, tuple(tprs)


def parse_grid(flag: str, text: str) -> tuple[int, ...]:
    """``"128,256,1024"`` -> ``(128, 256, 1024)``, sorted and deduplicated.

    Raises:
        ConfigError: naming `flag`, for anything but positive integers.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return tuple(sorted({int(p) for p in parts}))


def profile_engine(
    preset: str, *, tokens_grid: Sequence[int], batch_grid: Sequence[int],
    tpr_grid: Sequence[int], max_num_batched_tokens: int, repeats: int = 5, seed: int = 0,
    jitter: float = 0.01, timestamp: int = 0,
) -> tuple[dict[str, object], dict[str, object]]:
    """Measure TTFT and TPOT profiles of a simulated engine.

    Args:
        preset: engine preset name.
        tokens_grid: TTFT prompt lengths, tokens.
        batch_grid, tpr_grid: the TPOT grid, requests x context tokens per request.
        max_num_batched_tokens: the engine's chunk budget per step.
        repeats: samples per grid point.
        seed: seeds the TTFT prompt-length jitter.
        jitter: the largest TTFT prompt-length variation, as a fraction.
        timestamp: written to the metadata as is (0 keeps files reproducible).

    Returns:
        The TTFT and TPOT profiles as JSON-ready dicts (values in ms).

    Raises:
        ConfigError: an unknown preset, or a grid point the engine cannot run.
    """
    spec = get_preset(preset)
    _check_args(spec, tokens_grid, batch_grid, tpr_grid, max_num_batched_tokens, repeats, jitter)
    config = EngineConfig(num_gpu_blocks=spec.num_gpu_blocks, block_size=spec.block_size,
                          max_num_seqs=1, max_num_batched_tokens=max_num_batched_tokens,
                          enable_prefix_caching=False)
    rng = random.Random(seed)
    ttft_rows = [_ttft_row(spec, config, n, repeats, jitter, rng) for n in sorted(tokens_grid)]
    tpot_rows = [_tpot_row(spec, config, b, t, repeats)
                 for b in sorted(batch_grid) for t in sorted(tpr_grid)]
    what = (f"prescient simulated engine, max_num_batched_tokens={max_num_batched_tokens}, "
            f"{repeats} repeats")
    ttft = TtftProfile(metadata=ProfileMetadata(
        model=preset, timestamp=timestamp,
        description=f"{what}, seed {seed}: TTFT of a lone prompt"), results=tuple(ttft_rows))
    tpot = TpotProfile(metadata=ProfileMetadata(
        model=preset, timestamp=timestamp,
        description=f"{what}: decode step time of a batch"), results=tuple(tpot_rows))
    return msgspec.to_builtins(ttft), msgspec.to_builtins(tpot)


def write_profiles(out_dir: Path, ttft: dict[str, object], tpot: dict[str, object]
                   ) -> tuple[Path, Path]:
    """Write ``ttft.json`` and ``tpot.json`` (indented, keys in format order) into `out_dir`.

    Raises:
        ConfigError: the directory or a file cannot be written, named by its path.
    """
    paths = (out_dir / TTFT_FILE, out_dir / TPOT_FILE)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path, data in zip(paths, (ttft, tpot), strict=True):
            path.write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2) + b"\n")
    except OSError as e:
        raise ConfigError(f"{e.filename or out_dir}: cannot write: {e.strerror or e}") from None
    return paths


def read_slo_model(ttft_path: Path, tpot_path: Path) -> SloLatencyModel:
    """Load both profiles into a latency model.

    Raises:
        ConfigError: a file that cannot be read or checked, named by its path.
    """
    return SloLatencyModel.from_profiles(load_ttft_profile(_read(ttft_path), str(ttft_path)),
                                         load_tpot_profile(_read(tpot_path), str(tpot_path)))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None


def _check_args(spec: Preset, tokens_grid: Sequence[int], batch_grid: Sequence[int],
                tpr_grid: Sequence[int], max_num_batched_tokens: int, repeats: int,
                jitter: float) -> None:
    if max_num_batched_tokens < 1:
        raise ConfigError(f"--max-num-batched-tokens must be >= 1, got {max_num_batched_tokens}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    if not 0.0 <= jitter < 1.0:
        raise ConfigError(f"jitter must be in [0, 1), got {jitter}")
    for flag, grid in (("--tokens", tokens_grid), ("--batch-sizes", batch_grid),
                       ("--tokens-per-request", tpr_grid)):
        if not grid or min(grid) < 1:
            raise ConfigError(f"{flag}: expected positive integers, got {list(grid)}")
    if max(batch_grid) > max_num_batched_tokens:
        raise ConfigError(f"--batch-sizes {max(batch_grid)}: a decode batch larger than "
                          f"--max-num-batched-tokens {max_num_batched_tokens} cannot run")
    capacity = spec.num_gpu_blocks * spec.block_size
    if not _fits(spec, max(batch_grid), max(tpr_grid), repeats):
        raise ConfigError(
            f"--batch-sizes {max(batch_grid)} x --tokens-per-request {max(tpr_grid)}: the "
            f"batch does not fit in {spec.name}'s KV cache ({capacity} tokens)")
    if max(tokens_grid) * (1 + jitter) + 1 > capacity:
        raise ConfigError(f"--tokens {max(tokens_grid)}: the prompt does not fit in "
                          f"{spec.name}'s KV cache ({capacity} tokens)")


def _fits(spec: Preset, batch: int, tpr: int, repeats: int) -> bool:
    """A decode batch stays clear of preemption (with the engine's 1% watermark to spare)."""
    per_request = -(-(tpr + repeats + 2) // spec.block_size)
    return batch * per_request <= 0.98 * spec.num_gpu_blocks


def _ttft_row(spec: Preset, config: EngineConfig, tokens: int, repeats: int, jitter: float,
              rng: random.Random) -> TtftResult:
    span = int(tokens * jitter)
    lengths = [tokens]
    while len(lengths) < repeats:
        d = rng.randint(1, span) if span else 0
        lengths += [tokens + d, max(1, tokens - d)]
    samples = [_lone_ttft_ms(spec, config, n) for n in lengths[:repeats]]
    return TtftResult(tokens_num=tokens, p50=_pct(samples, 50), **_stats(samples))


def _tpot_row(spec: Preset, config: EngineConfig, batch: int, tpr: int, repeats: int
              ) -> TpotResult:
    samples = _decode_steps_ms(spec, config, batch, tpr, repeats)
    return TpotResult(batch_size=batch, tokens_per_request=tpr, p50=_pct(samples, 50),
                      **_stats(samples))


def _lone_ttft_ms(spec: Preset, config: EngineConfig, tokens: int) -> float:
    """Arrival to first token of a lone prompt on an idle engine, ms."""
    engine = SimEngine("profile", config, spec.step_model)
    reason = engine.add_request(Request(request_id="ttft", prompt_len=tokens), 0.0)
    if reason:
        raise ConfigError(f"--tokens {tokens}: {reason}")
    now = 0.0
    while True:
        end = engine.start_step(now)
        assert end is not None  # the request is queued until it finishes
        outcome = engine.complete_step()
        now = end
        if outcome.finished:
            first = outcome.finished[0].first_token_time
            assert first is not None
            return first * 1000.0


def _decode_steps_ms(spec: Preset, config: EngineConfig, batch: int, tpr: int, repeats: int
                     ) -> list[float]:
    """Durations of `repeats` decode steps of `batch` requests with about `tpr` context, ms.

    The whole batch is prefilled in one step (the budget is raised for it), so every request
    enters decoding together and the contexts stay equal.
    """
    prompt = max(1, round(tpr - (repeats + 1) / 2))  # contexts prompt+1 .. prompt+repeats
    config = msgspec.structs.replace(
        config, max_num_seqs=batch,
        max_num_batched_tokens=max(config.max_num_batched_tokens, batch * prompt))
    engine = SimEngine("profile", config, spec.step_model, skip_decode_runs=False)
    for i in range(batch):
        reason = engine.add_request(
            Request(request_id=f"tpot-{i}", prompt_len=prompt, output_len=repeats + 2), 0.0)
        if reason:
            raise ConfigError(f"--tokens-per-request {tpr}: {reason}")
    now = engine.start_step(0.0)
    assert now is not None
    engine.complete_step()
    samples = []
    for _ in range(repeats):
        end = engine.start_step(now)
        assert end is not None
        engine.complete_step()
        samples.append((end - now) * 1000.0)
        now = end
    return samples


def _pct(samples: Sequence[float], q: float) -> float:
    return round(float(np.percentile(samples, q)), 6)


def _stats(samples: Sequence[float]) -> dict[str, Any]:
    return {"mean": round(float(np.mean(samples)), 6), "std": round(float(np.std(samples)), 6),
            "min": round(min(samples), 6), "max": round(max(samples), 6),
            "p95": _pct(samples, 95), "p99": _pct(samples, 99),
            "raw_data": tuple(round(s, 6) for s in samples)}
