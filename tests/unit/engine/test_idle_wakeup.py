"""An engine that idled starts its next step late, by its `idle_wakeup_ms` table."""

from __future__ import annotations

import pytest

from prescient.engine import EngineConfig

from .test_core import make, req

WAKE = ((0.0, 0.0), (0.1, 4.0), (1.0, 10.0))


def test_the_first_step_after_an_idle_spell_starts_late_by_the_interpolated_table(run) -> None:
    # "a" finishes at 0.110 + 4 x 0.011 = 0.154; "b" comes 0.55 s later (7 ms late: the
    # table at 0.55 s), "c" 2 s after b ends (10 ms: flat past the last point)
    done = run(make(idle_wakeup_ms=WAKE), [req("a", 100, 5), req("b", 100, 1, 0.704),
                                           req("c", 100, 1, 3.0)])
    assert done["a"].first_token_time == pytest.approx(0.110)  # a fresh engine: no wake-up
    assert done["b"].first_token_time == pytest.approx(0.704 + 0.007 + 0.110)
    assert done["c"].first_token_time == pytest.approx(3.0 + 0.010 + 0.110)


def test_a_busy_engine_and_an_empty_table_start_at_once(run) -> None:
    # "b" arrives while "a" decodes: it joins a step boundary, no wake-up
    busy = run(make(idle_wakeup_ms=WAKE), [req("a", 100, 50), req("b", 100, 1, 0.2)])
    plain = run(make(), [req("a", 100, 50), req("b", 100, 1, 0.2)])
    assert busy["b"].first_token_time == plain["b"].first_token_time
    late = run(make(), [req("a", 100, 5), req("b", 100, 1, 0.704)])
    assert late["b"].first_token_time == pytest.approx(0.704 + 0.110)


def test_the_table_must_be_ascending_and_non_negative() -> None:
    for bad in (((0.5, 1.0), (0.1, 2.0)), ((0.1, -1.0),), ((0.1, 1.0), (0.1, 2.0))):
        with pytest.raises(ValueError, match="idle_wakeup_ms"):
            EngineConfig(num_gpu_blocks=10, idle_wakeup_ms=bad)
