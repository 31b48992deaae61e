"""`ideal_miss_rows`: what an infinite cache would leave to compute, as rows of their own."""

from __future__ import annotations

from prescient.sim.mooncake_synth import BLOCK, ideal_hit_rate, ideal_miss_rows, mooncake_rows


def test_each_row_loses_the_leading_blocks_an_earlier_row_had() -> None:
    rows = [{"timestamp": 0.0, "input_length": 3 * BLOCK - 10, "output_length": 5,
             "hash_ids": [100, 101, 7]},
            {"timestamp": 1.0, "input_length": 4 * BLOCK - 20, "output_length": 6,
             "hash_ids": [100, 101, 8, 9]},
            {"timestamp": 2.0, "input_length": 2 * BLOCK - 1, "output_length": 7,
             "hash_ids": [100, 5]}]
    out = ideal_miss_rows(rows)
    assert [r["input_length"] for r in out] == [3 * BLOCK - 10, 2 * BLOCK - 20, BLOCK - 1]
    assert [len(r["hash_ids"]) for r in out] == [3, 2, 1]
    ids = [i for r in out for i in r["hash_ids"]]
    assert len(ids) == len(set(ids))  # nothing shared: nothing left to cache
    assert [r["output_length"] for r in out] == [5, 6, 7]
    assert ideal_hit_rate(out) == 0.0


def test_the_generated_trace_keeps_about_half_its_prompt_tokens() -> None:
    rows = mooncake_rows(2000)
    kept = sum(r["input_length"] for r in ideal_miss_rows(rows))
    total = sum(r["input_length"] for r in rows)
    assert 0.4 < kept / total < 0.65
