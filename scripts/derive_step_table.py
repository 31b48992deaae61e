"""Turn Vidur's per-operator timings (mlp.csv) into a whole-model step-time table.

Usage: python scripts/derive_step_table.py VIDUR_MLP_CSV NUM_LAYERS OUT_CSV

For each `num_tokens` at tensor parallelism 1: the median of every per-layer operator (norms,
QKV and output projections, RoPE, MLP up/act/down, and the residual add twice) times the number
of layers, plus the embedding once. Attention itself is not in the file; the engine models it
analytically. Source data: microsoft/vidur data/profiling (MIT License, Copyright (c) Microsoft
Corporation).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict

PER_LAYER = ["input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
             "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add", "add"]


def main(src: str, layers: int, out: str) -> None:
    by_tokens: dict[int, list[float]] = defaultdict(list)
    with open(src, newline="") as f:
        for row in csv.DictReader(f):
            if int(row["num_tensor_parallel_workers"]) != 1:
                continue
            per_layer = sum(float(row[f"time_stats.{op}.median"]) for op in PER_LAYER)
            by_tokens[int(row["num_tokens"])].append(
                float(row["time_stats.emb.median"]) + layers * per_layer)
    with open(out, "w", newline="") as f:
        f.write("num_tokens,ms\n")
        for n in sorted(by_tokens):
            ms = sorted(by_tokens[n])[len(by_tokens[n]) // 2]
            f.write(f"{n},{ms:.4f}\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
