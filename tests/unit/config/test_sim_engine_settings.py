"""`SimEngineSettings`: flags, env and the checks that name the flag at fault."""

from __future__ import annotations

import pytest

from prescient.config.sim_engine import load_sim_engine_settings
from prescient.errors import ConfigError
from prescient.simengine.server import make_engine


def test_defaults_follow_vllm_and_upstream_llumnix() -> None:
    s = load_sim_engine_settings([], {})
    assert (s.host, s.port, s.model, s.preset) == ("0.0.0.0", 8000, "prescient-sim",
                                                   "llama3-8b-h100")
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.max_model_len) == (256, 8192, 8192)
    assert (s.llumlet_status_push_interval_s, s.llumlet_metadata_push_interval_s,
            s.cms_ttl_s) == (0.04, 20.0, 100.0)
    assert not s.enable_llumlet and s.resolved_instance_id == "sim-8000"


def test_flags_and_env_build_the_engine() -> None:
    env = {"PRESCIENT_SIM_ENGINE_TIME_SCALE": "5", "PRESCIENT_SIM_ENGINE_BLOCK_SIZE": "32",
           "PRESCIENT_SIM_ENGINE_PORT": "9100",
           "PRESCIENT_PORT": "1"}  # not this service's variable: ignored
    s = load_sim_engine_settings(
        ["--num-gpu-blocks", "64", "--max-num-seqs", "4", "--instance-type", "decode"], env)
    assert s.time_scale == 5.0 and s.instance_type == "decode"
    engine = make_engine(s)
    assert engine.instance_id == "sim-9100"
    assert (engine.config.num_gpu_blocks, engine.config.block_size) == (64, 32)
    assert engine.config.max_num_seqs == 4 and not engine.skip_decode_runs


@pytest.mark.parametrize(("argv", "flag"), [
    (["--preset", "nope"], "--preset"),
    (["--time-scale", "0"], "--time-scale"),
    (["--max-num-seqs", "10", "--max-num-batched-tokens", "5"], "--max-num-batched-tokens"),
    (["--cms-ttl-s", "10"], "--cms-ttl-s"),
    (["--instance-type", "both"], "--instance-type"),
])
def test_bad_values_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        load_sim_engine_settings(argv, {})
