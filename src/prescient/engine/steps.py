"""Arithmetic of a run of decode steps whose k-th step takes `alpha + beta * k` seconds."""

from __future__ import annotations

import math


def run_time(alpha: float, beta: float, n: int) -> float:
    """Total duration of the first `n` steps: `n * alpha + beta * n * (n - 1) / 2`."""
    return n * alpha + beta * n * (n - 1) / 2


def count_starts(alpha: float, beta: float, n: int, elapsed: float, strict: bool) -> int:
    """How many of the `n` steps started before `elapsed` (at or before, unless `strict`).

    Step k starts at `run_time(alpha, beta, k)`, which increases with k (alpha > 0, beta >= 0),
    so this solves a quadratic and then corrects the float rounding by looking at neighbours.
    """
    if elapsed < 0 or (strict and elapsed == 0):
        return 0

    def started(k: int) -> bool:
        t = run_time(alpha, beta, k)
        return t < elapsed if strict else t <= elapsed

    if beta <= 0.0:
        k = int(elapsed / alpha) + 1
    else:
        b = alpha - beta / 2
        k = int((-b + math.sqrt(b * b + 2 * beta * elapsed)) / beta) + 1
    k = min(max(k, 0), n)
    while k > 0 and not started(k - 1):
        k -= 1
    while k < n and started(k):
        k += 1
    return k
