from __future__ import annotations

import json
import random

import msgspec
import pytest

from prescient.config.scheduler import SchedulerSettings
from prescient.errors import ConfigError
from prescient.model import InstanceMetadata, InstanceStatus, Request
from prescient.policy import make_dispatcher
from prescient.predict.slo import SloLatencyModel, load_tpot_profile, load_ttft_profile

# TTFT: 10 ms + 0.1 ms per token; TPOT: 5 ms + 0.5 ms per request in the batch
TTFT = {"metadata": {}, "results": [{"tokens_num": n, "p50": 10 + 0.1 * n}
                                    for n in (100, 1000, 4000, 8000)]}
TPOT = {"metadata": {}, "results": [{"batch_size": b, "tokens_per_request": t, "p50": 5 + 0.5 * b}
                                    for b in (1, 8, 64) for t in (8, 512, 2048)]}


def model() -> SloLatencyModel:
    return SloLatencyModel.from_profiles(load_ttft_profile(json.dumps(TTFT).encode(), "ttft"),
                                         load_tpot_profile(json.dumps(TPOT).encode(), "tpot"))


def dispatcher(ttft_slo: float, tpot_slo: float = 50.0):
    settings = msgspec.structs.replace(SchedulerSettings(), ttft_slo=ttft_slo, tpot_slo=tpot_slo)
    d = make_dispatcher("slo", settings, random.Random(0), slo_model=model())
    d.on_instances({i: InstanceMetadata(instance_id=i, max_num_batched_tokens=8000)
                    for i in ("a", "b")}, 0.0)
    d.on_statuses({
        "a": InstanceStatus(instance_id="a", timestamp_ms=1000, update_id=1,
                            num_uncomputed_tokens_all_waiting_prefills=3000),
        "b": InstanceStatus(instance_id="b", timestamp_ms=1000, update_id=1,
                            num_uncomputed_tokens_all_waiting_prefills=1000),
    }, 1.0)
    return d


def test_least_predicted_ttft_wins_within_the_slo() -> None:
    d = dispatcher(ttft_slo=1000)
    # at t = 1.0 (no time elapsed): a = ttft(3000 + 1000) + step, b = ttft(1000 + 1000) + step
    assert d.schedule(Request(request_id="r1", prompt_len=1000), 1.0).instance_id == "b"


def test_nothing_is_available_when_every_instance_would_miss_the_slo() -> None:
    d = dispatcher(ttft_slo=150)  # b needs ~210 ms, a ~410 ms
    assert d.schedule(Request(request_id="r1", prompt_len=1000), 1.0).placements == ()
    tight_tpot = dispatcher(ttft_slo=1000, tpot_slo=5.0)  # every batch step is >= 5.5 ms
    assert tight_tpot.schedule(Request(request_id="r2", prompt_len=10), 1.0).placements == ()


def test_the_slo_policy_needs_its_profiles() -> None:
    with pytest.raises(ConfigError, match="ttft-profiling-data-path"):
        make_dispatcher("slo", SchedulerSettings(), random.Random(0))
