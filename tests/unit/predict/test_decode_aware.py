"""The decode-aware step time of the prefill replay: fit, fallback, and its use at dispatch."""

from __future__ import annotations

import random

import numpy as np
import pytest

from prescient.cms.view import ProfilingSample
from prescient.model import InstanceMetadata, InstanceStatus, Request
from prescient.policy.framework import SchedulingContext
from prescient.policy.state import ClusterState
from prescient.predict.decode_aware import DecodeAwareStepTime
from prescient.predict.enhanced import PredictorEnhancement
from prescient.predict.quadratic import PredictorBank

TRUE = (1e-6, 0.02, 5.6, 0.03, 5e-5)  # a, b, c, per decode, per decode context token


def true_ms(x: float, d: float, k: float) -> float:
    a, b, c, e, f = TRUE
    return a * x * x + b * x + c + e * d + f * k


def test_recovers_the_decode_terms_from_samples() -> None:
    rng = np.random.default_rng(1)
    model = DecodeAwareStepTime(num_warmup_samples=40)
    for _ in range(39):
        x, d = rng.uniform(100, 8000), rng.uniform(0, 250)
        k = d * rng.uniform(500, 2000)
        model.add(x, d, k, true_ms(x, d, k))
    assert not model.refit() and model.coefficients is None  # still warming up
    with pytest.raises(ValueError, match="no usable fit"):
        model.predict(100, 0, 0)
    for _ in range(200):
        x, d = rng.uniform(100, 8000), rng.uniform(0, 250)
        k = d * rng.uniform(500, 2000)
        model.add(x, d, k, true_ms(x, d, k))
    assert model.refit()
    assert model.coefficients == pytest.approx(TRUE, rel=1e-6)
    assert not model.refit()  # nothing new since


def test_no_decode_load_in_the_samples_leaves_the_fit_unusable() -> None:
    model = DecodeAwareStepTime(num_warmup_samples=5)
    for x in range(100, 5000, 100):
        model.add(x, 0, 0, 10 + 0.02 * x)  # D and K never vary: their terms are unknowable
    model.add(100, float("nan"), 0, 12.0)  # ignored
    model.add(100, 1, 0, -1.0)  # ignored
    assert model.num_samples == 49
    assert model.refit() and model.coefficients is None


def cluster(decodes: dict[str, int], context: int = 1000) -> ClusterState:
    st = ClusterState([InstanceMetadata(instance_id=i, max_num_batched_tokens=2048)
                       for i in decodes])
    for row, (iid, d) in enumerate(decodes.items()):
        st.set_status(row, InstanceStatus(
            instance_id=iid, timestamp_ms=0, update_id=1,
            num_uncomputed_tokens_all_waiting_prefills=50_000,
            scheduler_running_to_decode_requests_num=d,
            scheduler_running_to_decode_tokens_num=d * context, num_total_gpu_tokens=10**6))
    return st


def test_the_replay_slows_down_with_the_decode_batch() -> None:
    rng = np.random.default_rng(2)
    predicted = {}
    for aware in (False, True):
        feature = PredictorEnhancement(PredictorBank(20, shared=True), 2048,
                                       decode_aware=aware)
        for _ in range(10):  # polls: each status comes with one sample of its step
            loads = {f"i{k}": int(rng.integers(0, 300)) for k in range(8)}
            context = int(rng.integers(500, 2000))
            st = cluster(loads, context)
            samples = []
            for iid, d in loads.items():
                x = float(rng.integers(200, 2048 - d))
                samples.append(ProfilingSample(instance_id=iid, num_scheduled_prefill_tokens=x,
                                               step_duration_ms=true_ms(x, d, d * context)))
            feature.on_statuses(st, samples, 0.0)
        st = cluster({"idle": 0, "busy": 250})
        ctx = SchedulingContext(Request(request_id="r", prompt_len=1), st, 0.5,
                                random.Random(0))
        feature.prepare(ctx)
        predicted[aware] = ctx.predicted_computed_tokens.tolist()
    # without decode terms both instances replay alike; with them the busy one computes
    # less: its steps take longer and its decodes take 250 of the 2048-token budget
    assert predicted[False][0] == predicted[False][1]
    idle, busy = predicted[True]
    steps_ms = (true_ms(2048, 0, 0), true_ms(1798, 250, 250_000))
    assert idle == pytest.approx(2048 * 500 / steps_ms[0], rel=0.01)
    assert busy == pytest.approx(1798 * 500 / steps_ms[1], rel=0.01)
