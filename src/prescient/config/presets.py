"""Named engine presets: a step-time model plus KV capacity for a model on a GPU.

Where the numbers come from (the project's research notes, `shared/reference/papers.md` §5.3 and
§8; `tests/unit/engine/test_presets.py` checks the anchor step times quoted there):

- ``llama3-8b-h100``: T0 5.6 ms and 0.020 ms/token from Vidur's measured H100 non-attention
  timings (Llama-2-7B proxy, same GEMM shapes but the KV heads), which agree with BLIS
  (5.75 ms, 0.01725 ms/token) and NexusSched's fallback (0.0215 ms/token). KV read 5e-5 ms/token
  (128 KiB/token at ~3.35 TB/s * 0.8); prefill attention 1e-6 ms/token pair (4 * 32 layers *
  4096 FLOP per pair at ~50% of 989 TFLOPS); 6 us per decode sequence (BLIS beta2).
- ``llama3-8b-a100``: T0 9.7 ms and 0.066 ms/token (Vidur's measured A100 Llama-3-8B
  non-attention timings, linear fit over 512-8192 tokens); KV read 6.5e-5 ms/token (~2 TB/s);
  attention 3e-6 ms/pair (~55% of 312 TFLOPS); 30 us per sequence.
- ``llama3-8b-a100-table``: the same A100 measurements used directly as a table (tokens -> ms),
  with the analytic attention terms of ``llama3-8b-a100``.
- ``qwen3-32b-h20``: no public measurement, so a roofline with the efficiencies the two measured
  presets imply (~83% of memory bandwidth, ~80% of peak GEMM FLOPS): 65.5 GB of bf16 weights over
  4.0 TB/s -> T0 19.7 ms; 2 * 32.8e9 FLOP per token over 148 TFLOPS -> 0.554 ms/token; KV
  256 KiB/token (64 layers * 8 KV heads * 128 * 2 * 2 B) -> 7.9e-5 ms/token; attention
  4 * 64 * 8192 FLOP per pair at 50% -> 2.8e-5 ms/pair; 10 us per sequence.

- ``tiny-llama-cpu``: the tiny random-weight Llama of the real-vLLM tests (2 layers, hidden 128,
  fp32, 32-token blocks, 1 GiB of KV) on vLLM 0.32 CPU, one core, behind a lite gateway:
  measured by `bench/vllm_fidelity.py --write-preset` (step periods by scheduled tokens: decode
  token gaps for small steps, vLLM's model time plus the loop overhead for prefill-sized ones;
  and the serving path's per-request cost), stored in `data/preset_tiny-llama-cpu.json`.

KV capacity: an 80 GB GPU at 0.9 utilisation holds ~467k Llama-3-8B tokens (29,205 blocks of 16,
BLIS); an H20's 96 GB at 0.9 leaves 20.9 GB for Qwen3-32B's KV: ~79.7k tokens (4,980 blocks).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import msgspec

from prescient.engine.step_time import AnalyticStepTime, StepTimeModel, TableStepTime
from prescient.errors import ConfigError


class Preset(msgspec.Struct, frozen=True, kw_only=True):
    """A model on a GPU, as the simulated engine needs it."""

    name: str
    model: AnalyticStepTime | TableStepTime
    num_gpu_blocks: int  # of `block_size` tokens
    block_size: int = 16
    kv_bytes_per_token: int  # for migration transfer times
    source: str  # one line: where the coefficients come from
    # the serving frontend's time per request outside engine steps (HTTP, tokenization,
    # detokenization), ms: the simulator delays a request's arrival at the engine by it
    frontend_ms: float = 0.0
    # ...and this much more for a request whose engine is busy when it arrives (a CPU engine's
    # frontend shares the CPU with its steps), ms
    frontend_busy_ms: float = 0.0
    # (idle seconds, ms) pairs: how late the first step after an idle spell starts
    # (`EngineConfig.idle_wakeup_ms`)
    idle_wakeup_ms: tuple[tuple[float, float], ...] = ()

    @property
    def step_model(self) -> StepTimeModel:
        return self.model


PRESET_DIR = Path(str(resources.files("prescient") / "data"))
_LLAMA3_8B_KV = 2 * 32 * 8 * 128 * 2  # 128 KiB per token
_TINY_LLAMA_KV = 2 * 2 * 4 * 32 * 4  # 2 layers x K,V x 4 heads x 32 dims x fp32: 2 KiB
_QWEN3_32B_KV = 2 * 64 * 8 * 128 * 2  # 256 KiB per token


def _a100_table() -> TableStepTime:
    """Vidur's A100 Llama-3-8B non-attention timings, shipped as `data/steptime_*.csv`."""
    text = (resources.files("prescient") / "data" / "steptime_llama3-8b-a100.csv").read_text()
    rows = [line.split(",") for line in text.splitlines()[1:] if line.strip()]
    return TableStepTime(
        tokens=tuple(int(r[0]) for r in rows),
        ms=tuple(float(r[1]) for r in rows),
        c_attn=3e-6,
        c_kv=6.5e-5,
        c_seq=0.03,
    )


def _builtin() -> dict[str, Preset]:
    presets = [
        Preset(
            name="llama3-8b-h100",
            model=AnalyticStepTime(c0=5.6, c_tok=0.020, c_attn=1e-6, c_kv=5e-5, c_seq=0.006),
            num_gpu_blocks=29205,
            kv_bytes_per_token=_LLAMA3_8B_KV,
            source="Vidur H100 measurements, BLIS, NexusSched (papers.md §5.3)",
        ),
        Preset(
            name="llama3-8b-a100",
            model=AnalyticStepTime(c0=9.7, c_tok=0.066, c_attn=3e-6, c_kv=6.5e-5, c_seq=0.03),
            num_gpu_blocks=29205,
            kv_bytes_per_token=_LLAMA3_8B_KV,
            source="Vidur A100 Llama-3-8B measurements (papers.md §5.3)",
        ),
        Preset(
            name="qwen3-32b-h20",
            model=AnalyticStepTime(c0=19.7, c_tok=0.554, c_attn=2.8e-5, c_kv=7.9e-5, c_seq=0.01),
            num_gpu_blocks=4980,
            kv_bytes_per_token=_QWEN3_32B_KV,
            source="roofline: 148 TFLOPS, 4.0 TB/s, 96 GB (papers.md §8)",
        ),
    ]
    return {p.name: p for p in presets}


class _Measured(msgspec.Struct, frozen=True):
    """`data/preset_<name>.json`, as `bench/vllm_fidelity.py --write-preset` writes it."""

    tokens: tuple[int, ...]
    ms: tuple[float, ...]  # per-step time at `tokens` scheduled tokens, loop overhead included
    c_seq: float
    frontend_ms: float
    source: str
    c_kv: float = 0.0  # ms per decode per token of its context
    frontend_busy_ms: float = 0.0
    idle_wakeup_ms: tuple[tuple[float, float], ...] = ()


def _tiny_llama_cpu() -> Preset:
    measured = msgspec.json.decode((PRESET_DIR / "preset_tiny-llama-cpu.json").read_bytes(),
                                   type=_Measured)
    return Preset(
        name="tiny-llama-cpu",
        model=TableStepTime(tokens=measured.tokens, ms=measured.ms, c_attn=0.0,
                            c_kv=measured.c_kv, c_seq=measured.c_seq),
        num_gpu_blocks=16384, block_size=32, kv_bytes_per_token=_TINY_LLAMA_KV,
        frontend_ms=measured.frontend_ms, frontend_busy_ms=measured.frontend_busy_ms,
        idle_wakeup_ms=measured.idle_wakeup_ms,
        source=measured.source)


PRESETS: dict[str, Preset] = _builtin()
_LAZY = {"llama3-8b-a100-table", "tiny-llama-cpu"}


def preset_names() -> list[str]:
    """Every preset name, sorted."""
    return sorted([*PRESETS, *_LAZY])


def get_preset(name: str) -> Preset:
    """Look a preset up by name; an unknown name raises `ConfigError` listing the known ones."""
    if name in PRESETS:
        return PRESETS[name]
    if name == "llama3-8b-a100-table":
        base = PRESETS["llama3-8b-a100"]
        return msgspec.structs.replace(
            base, name=name, model=_a100_table(),
            source="Vidur A100 Llama-3-8B measurements as a table (data/steptime_*.csv)",
        )
    if name == "tiny-llama-cpu":
        return _tiny_llama_cpu()
    raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
