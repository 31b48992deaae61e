"""Tests for the Azure LLM 2023 and Mooncake trace loaders."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest

from prescient.errors import ConfigError, WorkloadError
from prescient.sim.traces import (
    bundled_trace,
    load_azure_csv,
    load_mooncake_jsonl,
    load_trace,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "traces"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def test_azure_small_fixture_hand_computed() -> None:
    trace = load_azure_csv(FIXTURES / "azure_small.csv")
    assert trace.num_skipped == 1  # the row with GeneratedTokens 0
    assert trace.source == str(FIXTURES / "azure_small.csv")
    requests = trace.requests
    # Rows are unsorted; the earliest (18:15:45.68059, file row 3) is time 0, and the last two
    # straddle midnight.
    assert [r.request_id for r in requests] == [
        "azure_small-000003",
        "azure_small-000000",
        "azure_small-000001",
        "azure_small-000004",
        "azure_small-000005",
    ]
    expected = [0.0, 1.0, 5.314579, 20653.81941, 20655.56941]
    assert [r.arrival_time for r in requests] == pytest.approx(expected, abs=1e-7)
    assert [(r.prompt_len, r.output_len) for r in requests] == [
        (879, 55),
        (374, 44),
        (396, 109),
        (10, 1),
        (20, 2),
    ]


def test_azure_crlf_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    rows = [HEADER, "2023-11-16 18:00:00.5,5,6", "", "2023-11-16 18:00:02,7,8", ""]
    path.write_bytes("\r\n".join(rows).encode())
    trace = load_azure_csv(path)
    assert [(r.arrival_time, r.prompt_len) for r in trace.requests] == [(0.0, 5), (1.5, 7)]


def test_azure_bad_row_names_file_and_line() -> None:
    path = FIXTURES / "azure_bad_line4.csv"
    with pytest.raises(WorkloadError) as info:
        load_azure_csv(path)
    assert str(info.value) == f"{path}:4: ContextTokens 'abc' is not an integer"


@pytest.mark.parametrize(
    ("lines", "line_no", "fragment"),
    [
        ([HEADER, "2023-11-16 18:00:00.0,5"], 2, "expected 3 columns, got 2"),
        ([HEADER, "2023-11-16 18:00:00.0,5,6,7"], 2, "expected 3 columns, got 4"),
        ([HEADER, "", "yesterday,5,6"], 3, "bad timestamp 'yesterday'"),
        ([HEADER, "2023-02-30 18:00:00.0,5,6"], 2, "bad date"),
        ([HEADER, "2023-11-16 25:00:00.0,5,6"], 2, "bad time of day"),
        ([HEADER, "2023-11-16 18:00:00.0,5,x"], 2, "GeneratedTokens 'x' is not an integer"),
        ([HEADER, "2023-11-16 18:00:00.0,-5,6"], 2, "ContextTokens -5 is negative"),
        (["2023-11-16 18:00:00.0,5,6"], 1, "expected a header"),
        ([], 1, "empty file"),
    ],
)
def test_azure_malformed_rows(
    tmp_path: Path, lines: list[str], line_no: int, fragment: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(WorkloadError) as info:
        load_azure_csv(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_no}: ")
    assert fragment in message


def test_mooncake_small_fixture() -> None:
    trace = load_mooncake_jsonl(FIXTURES / "mooncake_small.jsonl")
    assert trace.num_skipped == 1  # output_length 0
    requests = trace.requests
    assert [r.request_id for r in requests] == [
        "mooncake_small-000000",
        "mooncake_small-000002",
        "mooncake_small-000001",
    ]
    assert [r.arrival_time for r in requests] == [0.0, 1.2, 1.5]
    assert [r.prompt_len for r in requests] == [1000, 300, 1100]
    assert [r.output_len for r in requests] == [10, 5, 20]
    first, _, third = requests
    assert first.prefix_block_ids == (0, 1)
    assert third.prefix_block_ids[:2] == first.prefix_block_ids  # shared two-block prefix
    assert all(r.prefix_block_size == 512 for r in requests)


@pytest.mark.parametrize(
    ("lines", "line_no", "fragment"),
    [
        (['{"timestamp": 0, "input_length": 5, "output_length": 1}', "{not json"], 2, "bad JSON"),
        (["", '{"timestamp": 0, "input_length": 5}'], 2, "output_length"),
        (['{"timestamp": 0, "input_length": "5", "output_length": 1}'], 1, "input_length"),
        (['{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": 3}'], 1, "hash"),
        (['{"timestamp": -1, "input_length": 5, "output_length": 1}'], 1, ">= 0"),
        (["[1, 2, 3]"], 1, "bad JSON"),
    ],
)
def test_mooncake_malformed_lines(
    tmp_path: Path, lines: list[str], line_no: int, fragment: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(WorkloadError) as info:
        load_mooncake_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_no}: ")
    assert fragment in message


def test_load_trace_dispatches_by_suffix() -> None:
    assert len(load_trace(str(FIXTURES / "azure_small.csv")).requests) == 5
    assert len(load_trace(str(FIXTURES / "mooncake_small.jsonl")).requests) == 3


def test_load_trace_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.txt"):
        load_trace(str(tmp_path / "trace.txt"))
    with pytest.raises(ConfigError, match="azure-conv"):
        load_trace("azure-cnv")  # a typo of a bundled name
    missing = tmp_path / "missing.csv"
    with pytest.raises(WorkloadError, match=re.escape(str(missing))):
        load_trace(str(missing))
    with pytest.raises(WorkloadError, match=r"missing\.jsonl"):
        load_mooncake_jsonl(tmp_path / "missing.jsonl")


def test_bundled_trace_names() -> None:
    assert bundled_trace("azure-conv").name == "azure_llm_2023_conv.csv"
    assert bundled_trace("azure-code").is_file()
    with pytest.raises(ConfigError) as info:
        bundled_trace("sharegpt")
    assert "azure-code" in str(info.value) and "azure-conv" in str(info.value)


def test_bundled_azure_conv_trace() -> None:
    trace = load_trace("azure-conv")
    requests = trace.requests
    # 19,367 lines: the header and 19,366 rows (CRLF, no final newline); none has a zero count.
    assert len(requests) == 19_366
    assert trace.num_skipped == 0
    assert len({r.request_id for r in requests}) == len(requests)
    arrivals = [r.arrival_time for r in requests]
    assert arrivals[0] == 0.0
    assert arrivals == sorted(arrivals)
    assert arrivals[-1] == pytest.approx(3501.7219370, abs=1e-6)  # 19:14:08.40 - 18:15:46.68
    assert statistics.fmean(r.prompt_len for r in requests) == pytest.approx(1155, rel=0.05)
    assert statistics.fmean(r.output_len for r in requests) == pytest.approx(211, rel=0.05)


def test_bundled_azure_code_trace() -> None:
    trace = load_trace("azure-code")
    assert len(trace.requests) == 8_819
    assert trace.num_skipped == 0
    assert statistics.fmean(r.prompt_len for r in trace.requests) == pytest.approx(2048, rel=0.05)
