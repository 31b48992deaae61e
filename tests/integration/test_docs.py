"""The generated parts of the docs match the code they are generated from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "gen_config_docs.py"
DOC = ROOT / "docs" / "configuration.md"


def run_generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True,
                          text=True, cwd=ROOT, check=False)


def test_scheduler_flag_reference_is_up_to_date() -> None:
    result = run_generator("--check")
    assert result.returncode == 0, result.stderr + (
        "\nrun: .venv/bin/python scripts/gen_config_docs.py")


def test_check_mode_fails_on_a_stale_reference_and_changes_nothing(tmp_path: Path) -> None:
    stale = DOC.read_text().replace("`PRESCIENT_SCHEDULER_DISPATCH_TOP_K`",
                                    "`PRESCIENT_SCHEDULER_TOP_K`")
    copy = tmp_path / "configuration.md"
    copy.write_text(stale)
    result = run_generator("--check", "--doc", str(copy))
    assert result.returncode == 1
    assert "stale" in result.stderr
    assert copy.read_text() == stale
