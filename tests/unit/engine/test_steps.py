from __future__ import annotations

import random

from prescient.engine.steps import count_starts, run_time


def brute(alpha: float, beta: float, n: int, elapsed: float, strict: bool) -> int:
    starts = [run_time(alpha, beta, k) for k in range(n)]
    return sum(1 for s in starts if (s < elapsed if strict else s <= elapsed))


def test_run_time_is_the_sum_of_step_times() -> None:
    assert run_time(0.01, 0.001, 4) == 0.01 * 4 + 0.001 * (0 + 1 + 2 + 3)


def test_count_starts_matches_brute_force_including_exact_boundaries() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        alpha, beta = rng.uniform(1e-3, 0.05), rng.choice([0.0, rng.uniform(0, 1e-3)])
        n = rng.randint(1, 300)
        k = rng.randint(0, n)
        elapsed = run_time(alpha, beta, k) + rng.choice([0.0, 1e-12, -1e-12, rng.random() * alpha])
        for strict in (True, False):
            assert count_starts(alpha, beta, n, elapsed, strict) == brute(
                alpha, beta, n, elapsed, strict)
