"""The online step-time model: upstream's fit chain plus window, drift detection and reset."""

from __future__ import annotations

import numpy as np
import pytest

from prescient.cms.view import ProfilingSample
from prescient.predict import (
    FitKind,
    PredictorBank,
    PredictorNotFittedError,
    QuadraticPredictor,
    fit_step_time,
)


def step_ms(x: float, speed: float = 1.0) -> float:
    """A made-up engine: 4 ms fixed, 0.02 ms per token, a small attention term."""
    return speed * (1e-5 * x * x + 0.02 * x + 4.0)


def fed(xs: list[float], speed: float = 1.0, **kwargs: float | None) -> QuadraticPredictor:
    predictor = QuadraticPredictor(**kwargs)  # type: ignore[arg-type]
    for x in xs:
        predictor.add_sample(x, step_ms(x, speed))
    return predictor


def spread(n: int, seed: int = 0) -> list[float]:
    return [float(x) for x in np.random.default_rng(seed).integers(1, 513, n)]


def test_noise_free_quadratic_is_recovered_exactly() -> None:
    predictor = fed(spread(50))
    assert predictor.needs_refit
    assert predictor.maybe_refit()
    assert predictor.fit_kind is FitKind.QUADRATIC
    assert predictor.coefficients == pytest.approx((1e-5, 0.02, 4.0), rel=1e-6)
    assert predictor.predict(300) == pytest.approx(step_ms(300), rel=1e-9)
    assert not predictor.maybe_refit()  # fitted: nothing to do


def test_raw_token_counts_make_wide_ranges_fall_back_to_linear_as_upstream() -> None:
    xs = np.random.default_rng(1).uniform(1, 65536, 200)
    kind, a, b, c = fit_step_time(xs, 0.01 * xs + 5.0)
    assert kind is FitKind.LINEAR
    assert (a, b, c) == pytest.approx((0.0, 0.01, 5.0))


def test_two_distinct_x_make_the_quadratic_rank_deficient_and_the_line_exact() -> None:
    predictor = fed([100.0, 300.0] * 15)
    predictor.fit()
    assert predictor.fit_kind is FitKind.LINEAR
    assert predictor.coefficients[0] == 0
    assert predictor.predict(100) == pytest.approx(step_ms(100))
    assert predictor.predict(300) == pytest.approx(step_ms(300))


def test_one_distinct_x_falls_back_to_the_mean() -> None:
    predictor = QuadraticPredictor(num_warmup_samples=3)
    for y in (10.0, 12.0, 14.0):
        predictor.add_sample(256, y)
    predictor.maybe_refit()
    assert predictor.fit_kind is FitKind.CONSTANT
    assert predictor.coefficients == (0.0, 0.0, 12.0)


def test_no_samples_fit_the_constant_zero() -> None:
    predictor = QuadraticPredictor()
    assert predictor.fit() is FitKind.CONSTANT
    assert predictor.predict(1000) == 0.0


def test_too_few_samples_are_not_ready_and_predict_raises() -> None:
    predictor = fed(spread(19))
    assert not predictor.ready_for_fit()
    assert not predictor.maybe_refit()
    with pytest.raises(PredictorNotFittedError):
        predictor.predict(10)
    predictor.add_sample(64, step_ms(64))
    assert predictor.ready_for_fit() and predictor.maybe_refit()


def test_a_new_sample_unfits_until_the_refit() -> None:
    predictor = fed(spread(20))
    predictor.maybe_refit()
    predictor.add_sample(10, step_ms(10))
    assert not predictor.fitted and predictor.needs_refit
    with pytest.raises(PredictorNotFittedError):
        _ = predictor.coefficients


def test_the_sample_window_drops_the_oldest() -> None:
    predictor = fed([float(x) for x in range(1, 31)], max_samples=25)
    assert predictor.num_samples == 25
    assert predictor.samples[0][0] == 6.0 and predictor.samples[-1][0] == 30.0


def test_drift_after_a_2x_slowdown_refits_from_recent_samples() -> None:
    predictor = fed(spread(500))
    predictor.maybe_refit()
    slow = spread(40, seed=7)
    triggered = []
    for i, x in enumerate(slow):
        if predictor.add_sample(x, step_ms(x, speed=2.0)):
            triggered.append(i)
        predictor.maybe_refit()
    assert triggered == [19]  # the 20th slow sample fills the window
    assert predictor.num_drift_resets == 1
    assert predictor.num_samples == 40  # 20 kept at the reset + 20 since
    for x in (1.0, 128.0, 512.0):
        assert predictor.predict(x) == pytest.approx(step_ms(x, speed=2.0), rel=0.05)


def test_noise_below_the_threshold_is_not_drift() -> None:
    rng = np.random.default_rng(3)
    predictor = fed(spread(100))
    predictor.maybe_refit()
    for x in spread(200, seed=4):
        assert not predictor.add_sample(x, step_ms(x) * rng.uniform(0.85, 1.15))
        predictor.maybe_refit()


def test_drift_with_a_window_below_warmup_returns_to_warm_up() -> None:
    predictor = fed(spread(30), num_warmup_samples=20, drift_window=5)
    predictor.maybe_refit()
    hits = [predictor.add_sample(x, step_ms(x, 3.0)) for x in spread(5, seed=9)]
    assert hits == [False] * 4 + [True]
    assert predictor.num_samples == 5 and predictor.fit_kind is None
    assert not predictor.needs_refit


def test_drift_detection_can_be_disabled() -> None:
    predictor = fed(spread(50), drift_threshold=None)
    predictor.maybe_refit()
    assert not any(predictor.add_sample(x, step_ms(x, 2.0)) for x in spread(50, seed=2))


def test_reset_drops_samples_and_fit() -> None:
    predictor = fed(spread(30))
    predictor.maybe_refit()
    predictor.reset()
    assert predictor.num_samples == 0 and not predictor.fitted and predictor.fit_kind is None


@pytest.mark.parametrize("kwargs", [
    {"num_warmup_samples": 0}, {"max_samples": 0}, {"drift_window": 0},
    {"max_samples": 10, "drift_window": 11}, {"drift_threshold": 0.0}])
def test_bad_settings_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        QuadraticPredictor(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("sample", [(10, 0.0), (10, -1.0), (float("nan"), 5.0), (1, np.inf)])
def test_bad_samples_raise(sample: tuple[float, float]) -> None:
    with pytest.raises(ValueError):
        QuadraticPredictor().add_sample(*sample)


def samples_for(instance_id: str, xs: list[float], speed: float) -> list[ProfilingSample]:
    return [ProfilingSample(instance_id, int(x), step_ms(x, speed)) for x in xs]


def test_bank_keeps_one_predictor_per_instance() -> None:
    bank = PredictorBank()
    bank.add_all(samples_for("fast", spread(30), 1.0) + samples_for("slow", spread(30), 2.0))
    bank.add_all(samples_for("cold", spread(5), 1.0))
    assert bank.get("fast") is None  # unfitted until the end of the status loop
    assert bank.maybe_refit_all() == 2
    fast, slow = bank.get("fast"), bank.get("slow")
    assert fast is not None and slow is not None
    assert slow.predict(256) == pytest.approx(2 * fast.predict(256))
    assert bank.get("cold") is None and bank.get("unknown") is None
    a, b, c = bank.coefficient_arrays(["slow", "cold", "fast"])
    assert np.isnan([a[1], b[1], c[1]]).all()
    assert (a[0], b[0], c[0]) == pytest.approx((2e-5, 0.04, 8.0), rel=1e-6)
    bank.reset("slow")
    assert bank.get("slow") is None and bank.get("fast") is not None
    bank.reset()
    assert bank.get("fast") is None


def test_shared_bank_reproduces_upstreams_single_predictor() -> None:
    bank = PredictorBank(shared=True)
    assert bank.shared
    bank.add_all(samples_for("p0", spread(10), 1.0) + samples_for("p1", spread(10, 1), 1.0))
    assert bank.maybe_refit_all() == 1  # 20 samples across instances reach the warm-up
    shared = bank.get("p0")
    assert shared is not None and bank.get("never-reported") is shared
    with pytest.raises(ValueError):
        bank.reset("p0")
    bank.reset()
    assert bank.get("p0") is None


def test_bank_validates_its_settings() -> None:
    with pytest.raises(ValueError):
        PredictorBank(num_warmup_samples=0)
