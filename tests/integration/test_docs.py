"""The generated parts of the docs match the code they are generated from."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "gen_config_docs.py"
DOC = ROOT / "docs" / "configuration.md"


def run_generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True,
                          text=True, cwd=ROOT, check=False)


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = load_generator()
PRESENT = [s for s in GEN.SERVICES if GEN.available(s)]


def block(text: str, service: object) -> str:
    start, end = text.index(GEN.begin_marker(service)), text.index(GEN.end_marker(service))
    return text[start:end]


def test_every_flag_reference_is_up_to_date() -> None:
    result = run_generator("--check")
    assert result.returncode == 0, result.stderr + (
        "\nrun: .venv/bin/python scripts/gen_config_docs.py")


def test_the_four_built_services_have_a_reference() -> None:
    keys = {s.key for s in PRESENT}
    assert {"scheduler", "gateway", "sim-engine", "discovery-agent"} <= keys


@pytest.mark.parametrize("service", PRESENT, ids=lambda s: s.key)
def test_each_block_lists_every_flag_with_its_own_env_prefix(service: object) -> None:
    from prescient.config.settings import describe, env_prefix

    cls = GEN.settings_class(service)
    text = block(DOC.read_text(), service)
    for opt in describe(cls):
        assert f"| `{opt.flag}` |" in text
        assert f"`{opt.env}`" in text
        assert opt.env.startswith(env_prefix(cls))
    assert env_prefix(cls) != "PRESCIENT_"  # services on one host must not share variables


@pytest.mark.parametrize("service", PRESENT, ids=lambda s: s.key)
def test_check_mode_fails_on_a_stale_block_and_changes_nothing(service: object,
                                                                tmp_path: Path) -> None:
    text = DOC.read_text()
    old = block(text, service)
    first_flag_row = next(line for line in old.splitlines() if line.startswith("| `--"))
    stale = text.replace(old, old.replace(first_flag_row, first_flag_row + " (edited by hand)"))
    assert stale != text
    copy = tmp_path / "configuration.md"
    copy.write_text(stale)
    result = run_generator("--check", "--doc", str(copy))
    assert result.returncode == 1
    assert "stale" in result.stderr
    assert copy.read_text() == stale


def test_rewrite_mode_restores_a_stale_block(tmp_path: Path) -> None:
    text = DOC.read_text()
    stale = text.replace("`PRESCIENT_GATEWAY_RETRY_MAX_COUNT`", "`PRESCIENT_RETRY_MAX_COUNT`")
    assert stale != text
    copy = tmp_path / "configuration.md"
    copy.write_text(stale)
    result = run_generator("--doc", str(copy))
    assert result.returncode == 0, result.stderr
    assert copy.read_text() == text


def test_missing_markers_are_an_error_naming_the_service(tmp_path: Path) -> None:
    gateway = next(s for s in PRESENT if s.key == "gateway")
    text = DOC.read_text().replace(GEN.begin_marker(gateway), "")
    copy = tmp_path / "configuration.md"
    copy.write_text(text)
    result = run_generator("--check", "--doc", str(copy))
    assert result.returncode == 1
    assert "prescient gateway" in result.stderr and "markers" in result.stderr


def test_a_service_without_a_settings_module_is_skipped_unless_the_doc_has_its_block() -> None:
    ghost = GEN.Service("prescient ghost", "prescient.config.no_such_module", "GhostSettings")
    text = DOC.read_text()
    assert GEN.update(text, [ghost]) == text
    with pytest.raises(SystemExit, match="no_such_module"):
        GEN.update(text + f"\n{GEN.begin_marker(ghost)}\n{GEN.end_marker(ghost)}\n", [ghost])
