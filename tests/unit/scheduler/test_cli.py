"""`prescient scheduler` from `prescient.scheduler.cli`: --print-config and bad settings."""

from __future__ import annotations

import pytest
import yaml

from prescient.cli import main as prescient_main
from prescient.config.scheduler import SchedulerSettings
from prescient.config.settings import describe


def main(argv: list[str], env: dict[str, str]) -> int:
    return prescient_main(["scheduler", *argv], env)


def test_print_config_resolves_flags_env_and_redacts_secrets(
        capsys: pytest.CaptureFixture[str]) -> None:
    [tpot] = [o for o in describe(SchedulerSettings) if o.name == "tpot_slo"]
    code = main(["--print-config", "--dispatch-top-k", "3", "--service-token", "t0k"],
                {tpot.env: "40"})
    assert code == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert (data["dispatch_top_k"], data["tpot_slo"], data["port"]) == (3, 40.0, 8002)
    assert data["service_token"] != "t0k"


def test_a_bad_setting_is_one_line_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "0"], {}) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--port" in err
    assert main(["--enable-full-mode-scheduling=false", "--llm-backend-discovery", "endpoints",
                 "--scheduling-policy", "flood"], {}) == 2
    assert "flood" in capsys.readouterr().err
