"""`prescient simulate` end to end, as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--duration", "15", "--warmup", "2", "--cooldown", "2", "--instances", "2",
        "--rate-scale", "4", "--policy", "round-robin,least-requests,oracle"]


def prescient(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prescient.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_summary_json_is_byte_identical_across_runs_with_one_seed() -> None:
    first = prescient("simulate", *TINY, "--summary-json", "--seed", "7")
    second = prescient("simulate", *TINY, "--summary-json", "--seed", "7")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    summaries = json.loads(first.stdout)
    assert [s["policy"] for s in summaries] == ["round-robin", "least-requests", "oracle"]
    assert all(s["num_completed"] == s["num_requests"] > 0 for s in summaries)


def test_table_and_out_dir(tmp_path: Path) -> None:
    out = prescient("simulate", *TINY, "--out", tmp_path / "res", "--ttft-slo", "500")
    assert out.returncode == 0, out.stderr
    assert "least-requests" in out.stdout and "SLO" in out.stdout
    files = {p.name for p in (tmp_path / "res").iterdir()}
    assert {"results.json", "requests-oracle.csv", "ttft_cdf.png", "tpot_cdf.png",
            "load_timeline.png"} <= files
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert results["scenario"]["slo"]["ttft_ms"] == 500


def test_scenario_file_with_synthetic_workload(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        'policies = ["random"]\n[cluster]\ninstances = 2\n'
        '[workload]\nkind = "synthetic"\nrate_scale = 1.0\nwarmup_s = 0\ncooldown_s = 0\n'
        '[workload.synthetic]\nrate = 5.0\nnum_requests = 50\noutput = "uniform:5:20"\n')
    out = prescient("simulate", "--scenario", scenario, "--summary-json")
    assert out.returncode == 0, out.stderr
    (summary,) = json.loads(out.stdout)
    assert summary["num_requests"] == summary["num_completed"] == 50


def test_bad_input_exits_2_with_a_one_line_message(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("cluster:\n  instancez: 3\n")
    bad_csv = tmp_path / "t.csv"
    bad_csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                       "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47.0,abc,1\n")
    cases = [
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "llama3-8b-h100:x"], "--preset"),
        (["--rate-scale", "0"], "--rate-scale"),
        (["--prompt-len", "lognormal:mean=3"], "bad length spec"),
        (["--scenario", bad_key], "instancez"),
        (["--trace", bad_csv], f"{bad_csv}:3:"),
        (["--trace", tmp_path / "missing.jsonl"], "not found"),
        (["--duration", "5", "--warmup", "10"], "--warmup / --cooldown"),
        (["--cooldown", "-1"], "--cooldown must be >= 0"),
        (["--status-push-interval-ms", "0"], "--status-push-interval-ms"),
        (["--dispatch-top-k", "0"], "--dispatch-top-k"),
        (["--enable-full-mode-scheduling=maybe"], "--enable-full-mode-scheduling"),
    ]
    for args, message in cases:
        out = prescient("simulate", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_synthetic_flags_pick_the_synthetic_workload_at_its_own_rate() -> None:
    out = prescient("simulate", "--rate", "5", "--num-requests", "300", "--instances", "2",
                    "--policy", "round-robin", "--warmup", "0", "--cooldown", "0",
                    "--output-len", "uniform:5:20", "--summary-json")
    assert out.returncode == 0, out.stderr
    (summary,) = json.loads(out.stdout)
    assert summary["num_requests"] == 300  # the generator made 300, not the default 2,000
    assert 50 < summary["duration_s"] < 70  # 300 requests at 5 req/s, not compressed 20x


def test_engine_environment_variables_are_checked(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from prescient.cli import main

    for name in ("LLUMNIX_PROFILING_STEPS", "LLUMNIX_MAX_REQ_MIG_IN", "LLUMNIX_MAX_REQ_MIG_OUT"):
        monkeypatch.setenv(name, "x")
        assert main(["simulate"]) == 2
        assert f"{name} must be a whole number, got 'x'" in capsys.readouterr().err
        monkeypatch.delenv(name)
