from __future__ import annotations

import math
import random
import statistics

import pytest

from prescient.errors import ConfigError
from prescient.model import Request
from prescient.predict.output_length import (
    HistogramOutputLength,
    NoisyOutputLength,
    OracleOutputLength,
    make_output_predictor,
)


def request(prompt: int, output: int) -> Request:
    return Request(request_id="r", prompt_len=prompt, output_len=output)


def test_oracle_and_zero_noise_are_exact_and_noise_is_multiplicative_and_seeded() -> None:
    assert OracleOutputLength().predict(request(100, 77)) == 77
    assert NoisyOutputLength(0.0, random.Random(0)).predict(request(100, 77)) == 77
    noisy = NoisyOutputLength(0.5, random.Random(3))
    again = NoisyOutputLength(0.5, random.Random(3))
    ratios = [noisy.predict(request(10, 200)) / 200 for _ in range(4000)]
    assert statistics.median(ratios) == pytest.approx(1.0, abs=0.05)
    assert statistics.pstdev([math.log(r) for r in ratios]) == pytest.approx(0.5, rel=0.1)
    assert [again.predict(request(10, 200)) / 200 for _ in range(4000)] == ratios  # seeded


def test_histogram_learns_per_prompt_bucket() -> None:
    h = HistogramOutputLength(prior=128)
    assert h.predict(request(100, 1)) == 128  # nothing seen yet
    for out in (10, 20, 30):
        h.observe(request(100, out), out)  # bucket of 64..127
    for out in (500, 600, 700):
        h.observe(request(3000, out), out)  # bucket of 2048..4095
    assert h.predict(request(90, 1)) == 20
    assert h.predict(request(2500, 1)) == 600
    assert h.predict(request(20_000, 1)) == 265  # unseen bucket: the global median


def test_specs() -> None:
    assert make_output_predictor("none", random.Random(0)) is None
    assert isinstance(make_output_predictor("oracle", random.Random(0)), OracleOutputLength)
    assert isinstance(make_output_predictor("lognormal:sigma=0.3", random.Random(0)),
                      NoisyOutputLength)
    for bad in ("lognormal", "lognormal:sigma=x", "magic", "oracle:1"):
        with pytest.raises(ConfigError, match="output-length predictor"):
            make_output_predictor(bad, random.Random(0))
