"""The synthetic Mooncake-format trace: schema, published statistics, ideal hit rate."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np

from prescient.sim.mooncake_synth import BLOCK, ideal_hit_rate, mooncake_rows
from prescient.sim.traces import load_mooncake_jsonl


def test_rows_load_as_a_mooncake_trace(tmp_path: Path) -> None:
    rows = mooncake_rows(200, seed=3)
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows))
    trace = load_mooncake_jsonl(path)
    assert len(trace.requests) == 200
    for row in rows:
        ids = row["hash_ids"]
        assert isinstance(ids, list) and isinstance(row["input_length"], int)
        # the last block is partial: the ids cover the prompt, and no more
        assert (len(ids) - 1) * BLOCK < row["input_length"] < len(ids) * BLOCK
    times = [r["timestamp"] for r in rows]
    assert times == sorted(times)


def test_the_published_statistics_hold() -> None:
    rows = mooncake_rows(6000)
    inputs = np.array([r["input_length"] for r in rows])
    outputs = np.array([r["output_length"] for r in rows])
    assert 7_200 < inputs.mean() < 8_000  # the Mooncake paper's 7,590
    assert np.median(inputs) < 0.85 * inputs.mean()  # heavy-tailed
    assert 170 < outputs.mean() < 195  # 182
    assert 0.40 < ideal_hit_rate(rows) < 0.55  # "up to 50% cache hit"


def test_a_seed_gives_one_trace() -> None:
    assert mooncake_rows(50, seed=1) == mooncake_rows(50, seed=1)
    assert mooncake_rows(50, seed=1) != mooncake_rows(50, seed=2)


def test_the_ideal_hit_counts_the_contiguous_run_of_blocks_seen_before() -> None:
    rows = [{"hash_ids": [1, 2, 3]},
            {"hash_ids": [1, 2, 4]},  # 2 of 3 held
            {"hash_ids": [9, 2, 3]},  # its first block is new: nothing counts after it
            {"hash_ids": [1, 2, 3, 5]}]  # 3 of 4
    assert ideal_hit_rate(rows) == (0 + 2 + 0 + 3) / 13
