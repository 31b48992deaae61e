"""`prescient scheduler` as a real process: --help, --print-config, the env layer, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prescient.cli import main
from prescient.config import SchedulerSettings, describe, load_scheduler_settings
from prescient.config.scheduler import GROUPS


def prescient(*args: str | Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prescient.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "100", **(env or {})})


def test_help_lists_every_group_and_flag_with_defaults() -> None:
    out = prescient("scheduler", "--help")
    assert out.returncode == 0, out.stderr
    for title in GROUPS:
        assert f"\n{title}:\n" in out.stdout
    for opt in describe(SchedulerSettings):
        assert opt.flag in out.stdout
    for flag in ("--config", "--extra-args", "--print-config"):
        assert flag in out.stdout
    assert "default: 8002" in out.stdout


def test_print_config_round_trips_through_a_config_file(tmp_path: Path) -> None:
    out = prescient("scheduler", "--print-config", "--dispatch-top-k", "3",
                    "--rescheduling-policies", "decode_load", "--enable-adaptive-pd",
                    env={"PRESCIENT_SCHEDULER_TPOT_SLO": "40"})
    assert out.returncode == 0, out.stderr
    data = yaml.safe_load(out.stdout)
    assert list(data) == sorted(data)
    assert (data["dispatch_top_k"], data["rescheduling_policies"], data["tpot_slo"]) == (
        3, ["decode_load"], 40.0)
    path = tmp_path / "scheduler.yaml"
    path.write_text(out.stdout)
    again = load_scheduler_settings(["--config", str(path)], {})
    assert again == load_scheduler_settings(
        ["--dispatch-top-k", "3", "--rescheduling-policies", "decode_load",
         "--enable-adaptive-pd"], {"PRESCIENT_SCHEDULER_TPOT_SLO": "40"})


def test_a_bad_port_stops_the_service_before_it_serves(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scheduler", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "prescient: error: --port: expected an integer >= 1 and <= 65535, got '0'"


def test_bad_value_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scheduler", "--print-config", "--dispatch-top-k", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (
        "prescient: error: --dispatch-top-k: expected an integer >= 1, got '0'")


def test_deprecated_alias_warns_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scheduler", "--print-config", "--reschedule-interval-ms", "100"]) == 0
    captured = capsys.readouterr()
    assert "rescheduling_interval_ms: 100" in captured.out
    assert ("prescient: warning: --reschedule-interval-ms is deprecated; use "
            "--rescheduling-interval-ms") in captured.err


def test_secrets_are_redacted_in_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scheduler", "--print-config", "--service-token", "hunter2"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "service_token: <redacted>" in out


def test_unknown_flag_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["scheduler", "--no-such-flag"])
    assert info.value.code == 2
