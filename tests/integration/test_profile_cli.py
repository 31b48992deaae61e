"""`prescient profile` as a real process, and its profile predicting the engine it measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prescient.cli import main
from prescient.config.presets import get_preset
from prescient.engine import EngineConfig, SimEngine
from prescient.model import Request
from prescient.predict.slo import SloLatencyModel, load_tpot_profile, load_ttft_profile
from prescient.profiling import profile_engine, read_slo_model

PRESET = "llama3-8b-h100"
TOKENS = (64, 256, 1024, 2048, 4096, 8192)
BATCHES = (1, 8, 32, 128)
TPRS = (8, 128, 1024)


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("profile")
    run = subprocess.run(
        [sys.executable, "-m", "prescient.cli", "profile", "--preset", PRESET, "--out-dir",
         str(out), "--tokens", ",".join(map(str, TOKENS)),
         "--batch-sizes", ",".join(map(str, BATCHES)),
         "--tokens-per-request", ",".join(map(str, TPRS)), "--repeats", "3"],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "TTFT" in run.stdout
    return out


def test_files_load_and_latency_grows_with_work(profile_dir: Path) -> None:
    ttft = load_ttft_profile((profile_dir / "ttft.json").read_bytes(), "ttft.json")
    tpot = load_tpot_profile((profile_dir / "tpot.json").read_bytes(), "tpot.json")
    assert ttft.metadata.model == PRESET
    assert [r.tokens_num for r in ttft.results] == list(TOKENS)
    assert all(len(r.raw_data) == 3 and r.min <= r.p50 <= r.max for r in ttft.results)
    assert np.all(np.diff([r.p50 for r in ttft.results]) > 0)
    grid = {(r.batch_size, r.tokens_per_request): r.p50 for r in tpot.results}
    assert len(grid) == len(BATCHES) * len(TPRS)
    for tpr in TPRS:
        assert np.all(np.diff([grid[(b, tpr)] for b in BATCHES]) > 0)
    for b in BATCHES:
        assert np.all(np.diff([grid[(b, t)] for t in TPRS]) > 0)


def engine(max_batched: int = 8192) -> SimEngine:
    p = get_preset(PRESET)
    config = EngineConfig(num_gpu_blocks=p.num_gpu_blocks, block_size=p.block_size,
                          max_num_batched_tokens=max_batched)
    return SimEngine("e", config, p.step_model, skip_decode_runs=False)


def lone_ttft_ms(prompt: int) -> float:
    e = engine()
    e.add_request(Request(request_id="r", prompt_len=prompt), 0.0)
    now = 0.0
    while True:
        end = e.start_step(now)
        assert end is not None
        done = e.complete_step().finished
        now = end
        if done:
            return end * 1000.0


@pytest.mark.parametrize("prompt", [100, 700, 3000, 6000, 8192])
def test_profile_predicts_the_engines_own_lone_ttft(profile_dir: Path, prompt: int) -> None:
    m = read_slo_model(profile_dir / "ttft.json", profile_dir / "tpot.json")
    predicted = float(m.predict_ttft_by_chunks(prompt, 0, 0, 8192))
    assert predicted == pytest.approx(lone_ttft_ms(prompt), rel=0.05)


def test_profile_predicts_a_decode_step_between_grid_points(profile_dir: Path) -> None:
    batch, prompt = 20, 400
    e = engine(max_batched=batch * prompt)
    for i in range(batch):
        e.add_request(Request(request_id=f"r{i}", prompt_len=prompt, output_len=50), 0.0)
    now = e.start_step(0.0)
    assert now is not None
    e.complete_step()
    end = e.start_step(now)  # the first decode step (contexts prompt + 1)
    assert end is not None
    m: SloLatencyModel = read_slo_model(profile_dir / "ttft.json", profile_dir / "tpot.json")
    predicted = float(m.predict_tpot(batch, batch * (prompt + 1)))
    assert predicted == pytest.approx((end - now) * 1000.0, rel=0.05)


def test_profiles_are_deterministic() -> None:
    kwargs = dict(tokens_grid=(128, 4096), batch_grid=(1, 4), tpr_grid=(8, 64),
                  max_num_batched_tokens=8192, repeats=4, seed=3)
    assert profile_engine(PRESET, **kwargs) == profile_engine(PRESET, **kwargs)  # type: ignore[arg-type]
    ttft, _ = profile_engine(PRESET, **kwargs)  # type: ignore[arg-type]
    assert ttft["results"][1]["std"] > 0  # type: ignore[index]


@pytest.mark.parametrize(("flags", "message"), [
    (["--tokens", "128,abc"], "--tokens: expected comma-separated positive integers"),
    (["--batch-sizes", "0"], "--batch-sizes: expected comma-separated positive integers"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--batch-sizes", "256", "--tokens-per-request", "8192"], "does not fit in"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        flags: list[str], message: str) -> None:
    assert main(["profile", "--out-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prescient: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "ttft.json").exists()
