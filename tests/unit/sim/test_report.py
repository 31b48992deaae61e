"""Tests for prescient.sim.report: the comparison table and the results directory."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import msgspec
from rich.console import Console

from prescient.sim.metrics import SloSpec, Summary, summarize
from prescient.sim.records import LoadSample, RequestRecord
from prescient.sim.report import (
    CSV_COLUMNS,
    format_table_text,
    render_table,
    safe_filename,
    write_results,
)

SLO = SloSpec(ttft_s=0.5, tpot_s=0.05)


def records(scale: float) -> list[RequestRecord]:
    """Four finished requests (TTFT 0.1..0.4 s times `scale`), one rejected, one unfinished."""
    out = [
        RequestRecord(
            request_id=f"r{i}",
            arrival_time=float(i),
            prompt_len=100,
            output_len=1 if i == 0 else 20,
            instance_id=f"i{i % 2}",
            first_scheduled_time=i + 0.01,
            first_token_time=i + 0.1 * (i + 1) * scale,
            finish_time=i + 0.1 * (i + 1) * scale + 0.5,
            num_preemptions=i % 2,
            num_cached_tokens=16,
        )
        for i in range(4)
    ]
    out.append(
        RequestRecord(
            request_id="rej",
            arrival_time=4.0,
            prompt_len=9000,
            output_len=5,
            rejected="prompt too long",
        )
    )
    out.append(
        RequestRecord(
            request_id="run",
            arrival_time=4.5,
            prompt_len=10,
            output_len=5,
            instance_id="i1",
            first_scheduled_time=4.6,
        )
    )
    return out


def load(n_instances: int) -> list[LoadSample]:
    return [
        LoadSample(
            time=t * 0.5,
            instance_id=f"i{k}",
            num_running=(t + k) % 4,
            num_waiting=t % 3,
            kv_usage=0.5,
        )
        for t in range(12)
        for k in range(n_instances)
    ]


def summaries(slo: SloSpec | None) -> tuple[list[Summary], dict[str, list[RequestRecord]]]:
    by_policy = {"round-robin": records(2.0), "prescient/kv aware": records(1.0)}
    return [summarize(p, r, slo=slo) for p, r in by_policy.items()], by_policy


def test_format_table_text_lists_policies_and_slo_column_only_with_slo() -> None:
    with_slo, _ = summaries(SLO)
    text = format_table_text(with_slo, SLO)
    assert "round-robin" in text
    assert "prescient/kv aware" in text
    assert "SLO" in text and "met" in text
    assert "4/6" in text  # completed / measured
    assert "TTFT <= 500 ms" in text

    without, _ = summaries(None)
    text = format_table_text(without, None)
    assert "round-robin" in text and "prescient/kv aware" in text
    assert "SLO" not in text and "%" not in text


def test_table_keeps_order_and_fits_100_columns() -> None:
    sums, _ = summaries(SLO)
    text = format_table_text(list(reversed(sums)), SLO)
    assert text.index("prescient/kv aware") < text.index("round-robin")
    console = Console(record=True, width=100, file=io.StringIO(), color_system=None)
    render_table(sums, slo=SLO, console=console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 100
    assert any(line.strip().startswith("round-robin") for line in lines)  # no wrapped name


def test_best_latency_value_is_marked() -> None:
    sums, _ = summaries(SLO)
    console = Console(
        record=True, width=120, file=io.StringIO(), color_system="standard", force_terminal=True
    )
    render_table(sums, slo=SLO, console=console)
    styled = console.export_text(styles=True)
    # "prescient/kv aware" has half the TTFT of "round-robin": only its mean is green.
    assert f"\x1b[1;32m{250.0:.1f}" in styled
    assert f"\x1b[1;32m{500.0:.1f}" not in styled
    assert "500.0" in styled


def test_write_results_creates_every_file(tmp_path: Path) -> None:
    sums, by_policy = summaries(SLO)
    out = tmp_path / "nested" / "run"
    paths = write_results(
        out,
        summaries=sums,
        records_by_policy=by_policy,
        load_by_policy={"round-robin": load(3), "prescient/kv aware": load(2)},
        scenario={"seed": 7, "rate": 1.2345678, "trace": Path("x/y.csv")},
    )
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "results.json",
            "requests-round-robin.csv",
            "requests-prescient_kv_aware.csv",
            "ttft_cdf.png",
            "tpot_cdf.png",
            "load_timeline.png",
        ]
    )
    assert all(p.parent == out and p.is_file() for p in paths)
    for name in ("ttft_cdf.png", "tpot_cdf.png", "load_timeline.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    results = msgspec.json.decode((out / "results.json").read_bytes())
    assert results["scenario"] == {"seed": 7, "rate": 1.23457, "trace": "x/y.csv"}
    assert [s["policy"] for s in results["summaries"]] == ["round-robin", "prescient/kv aware"]


def test_csv_rows_have_all_columns_and_empty_cells_for_none(tmp_path: Path) -> None:
    sums, by_policy = summaries(None)
    write_results(
        tmp_path, summaries=sums, records_by_policy=by_policy, load_by_policy={}, scenario={}
    )
    with (tmp_path / "requests-round-robin.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 1 + 6
    assert all(len(row) == len(CSV_COLUMNS) for row in rows)
    col = {name: i for i, name in enumerate(CSV_COLUMNS)}
    r0, rejected, unfinished = rows[1], rows[5], rows[6]
    assert r0[col["tpot"]] == ""  # one-token output
    assert r0[col["ttft"]] == "0.200000"
    assert rejected[col["rejected"]] == "prompt too long"
    assert rejected[col["instance_id"]] == ""
    assert rejected[col["ttft"]] == rejected[col["e2e"]] == rejected[col["queueing_delay"]] == ""
    assert unfinished[col["queueing_delay"]] == "0.100000"
    assert unfinished[col["e2e"]] == "" and unfinished[col["rejected"]] == ""


def test_results_json_is_byte_identical_across_runs(tmp_path: Path) -> None:
    def run(out: Path) -> bytes:
        sums, by_policy = summaries(SLO)
        write_results(
            out,
            summaries=sums,
            records_by_policy=by_policy,
            load_by_policy={},
            scenario={"seed": 1},
        )
        return (out / "results.json").read_bytes()

    assert run(tmp_path / "a") == run(tmp_path / "b")


def test_safe_filename_and_collisions(tmp_path: Path) -> None:
    assert safe_filename("a b/c:d*é") == "a_b_c_d__"
    assert safe_filename("ok-name_1.2") == "ok-name_1.2"
    assert safe_filename("") == "_"
    by_policy = {"a/b": records(1.0)[:1], "a_b": records(1.0)[:1]}
    sums = [summarize(p, r) for p, r in by_policy.items()]
    paths = write_results(
        tmp_path, summaries=sums, records_by_policy=by_policy, load_by_policy={}, scenario={}
    )
    csvs = sorted(p.name for p in paths if p.suffix == ".csv")
    assert csvs == ["requests-a_b-2.csv", "requests-a_b.csv"]
