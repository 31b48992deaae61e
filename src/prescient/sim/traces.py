"""Loaders for public LLM-serving traces, turning each row into a `Request`.

Real traces carry the arrival burstiness and length mix that synthetic workloads only
approximate, so experiments replay them (usually rescaled with `workload.scale_rate`). Two
formats are read:

* Azure LLM inference 2023 (Splitwise): CSV `TIMESTAMP,ContextTokens,GeneratedTokens`, wall-clock
  timestamps such as `2023-11-16 18:15:46.6805900`. Two copies ship with Prescient
  (`bundled_trace`).
* Mooncake FAST'25: JSON lines `{"timestamp": ms, "input_length", "output_length", "hash_ids"}`,
  one hash id per 512-token block; equal ids mean a shared prefix.

A loader returns a `Trace`: the requests sorted by arrival (stably), where they came from, and
how many rows were skipped because they describe an empty prompt or output (a failed request in
the log, not a malformed file). A malformed row raises `WorkloadError` with the message
`"<path>:<line>: <what is wrong>"`, the line 1-based, so the row can be found and fixed.
"""

from __future__ import annotations

import datetime
import importlib.resources
import re
from pathlib import Path

import msgspec

from prescient.errors import ConfigError, WorkloadError
from prescient.model.request import Request

BUNDLED_TRACES: dict[str, str] = {
    "azure-conv": "azure_llm_2023_conv.csv",
    "azure-code": "azure_llm_2023_code.csv",
}
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_BLOCK_SIZE = 512  # tokens per Mooncake hash id

# `YYYY-MM-DD HH:MM:SS[.fraction]`, any number of fraction digits, space or `T` between.
_TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}):(\d{2}):(\d{2}(?:\.\d*)?)")


class Trace(msgspec.Struct, frozen=True, kw_only=True):
    """A loaded trace.

    Attributes:
        requests: One request per kept row, sorted by arrival time (ties keep file order).
        source: The file it was read from.
        num_skipped: Rows dropped because their prompt or output length was 0.
    """

    requests: list[Request]
    source: str
    num_skipped: int = 0


class _RowError(Exception):
    """A problem with one row; the loader adds the file and line."""


def _fail(path: Path, line: int, what: str) -> WorkloadError:
    return WorkloadError(f"{path}:{line}: {what}")


def bundled_trace(name: str) -> Path:
    """The path of a trace that ships with Prescient.

    Args:
        name: "azure-conv" or "azure-code".

    Raises:
        ConfigError: The name is not a bundled trace; the message lists the known names.
    """
    try:
        filename = BUNDLED_TRACES[name]
    except KeyError:
        known = ", ".join(sorted(BUNDLED_TRACES))
        raise ConfigError(f"unknown bundled trace {name!r}; known: {known}") from None
    return Path(str(importlib.resources.files("prescient") / "data" / filename))


def load_trace(spec: str) -> Trace:
    """Load a bundled trace by name, or a trace file by path (`.csv` Azure, `.jsonl` Mooncake).

    Raises:
        ConfigError: `spec` is neither a bundled name nor a path with a known suffix.
        WorkloadError: The file does not exist or is malformed.
    """
    if spec in BUNDLED_TRACES:
        return load_azure_csv(bundled_trace(spec))
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        known = ", ".join(sorted(BUNDLED_TRACES))
        raise ConfigError(
            f"trace {spec!r} is not a bundled trace ({known}) and its suffix {suffix!r} is not "
            "'.csv' (Azure LLM 2023) or '.jsonl' (Mooncake)"
        )
    if not path.is_file():
        raise WorkloadError(f"{path}: trace file not found")
    return load_azure_csv(path) if suffix == ".csv" else load_mooncake_jsonl(path)


def _read_lines(path: Path) -> list[str]:
    try:
        # read_text turns "\r\n" into "\n"; split on it only (str.splitlines also breaks at
        # form feeds and other separators), so line numbers match what editors show.
        return path.read_text(encoding="utf-8-sig").split("\n")
    except FileNotFoundError:
        raise WorkloadError(f"{path}: trace file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"{path}: cannot read: {exc}") from None


def _azure_header(fields: list[str]) -> tuple[int, int, int]:
    """Column indices of timestamp, context and generated tokens (names case-insensitive)."""
    names = [f.strip().lower() for f in fields]
    try:
        time_col, context_col, generated_col = (names.index(c.lower()) for c in AZURE_COLUMNS)
    except ValueError:
        raise _RowError(
            f"expected a header with columns {','.join(AZURE_COLUMNS)}, got {','.join(fields)!r}"
        ) from None
    return time_col, context_col, generated_col


def _parse_timestamp(text: str, ordinals: dict[str, int]) -> tuple[int, float]:
    """The day ordinal and seconds since midnight; `ordinals` caches parsed dates.

    Keeping the day apart keeps full precision: seconds since year 1 as one float would lose
    the sub-microsecond digits.
    """
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise _RowError(f"bad timestamp {text!r}, expected 'YYYY-MM-DD HH:MM:SS[.ffffff]'")
    date, hours, minutes, seconds = match.groups()
    ordinal = ordinals.get(date)
    if ordinal is None:
        try:
            ordinal = datetime.date.fromisoformat(date).toordinal()
        except ValueError:
            raise _RowError(f"bad date in timestamp {text!r}") from None
        ordinals[date] = ordinal
    h, m, s = int(hours), int(minutes), float(seconds)
    if h > 23 or m > 59 or s >= 61:
        raise _RowError(f"bad time of day in timestamp {text!r}")
    return ordinal, h * 3600.0 + m * 60.0 + s


def _parse_count(text: str, column: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _RowError(f"{column} {text!r} is not an integer") from None
    if value < 0:
        raise _RowError(f"{column} {value} is negative")
    return value


def load_azure_csv(path: str | Path) -> Trace:
    """Load an Azure LLM inference 2023 CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`).

    Arrival times are seconds since the earliest timestamp, so the first request arrives at 0.
    Request ids are `<file stem>-<data row index>`, the index 0-based in file order (blank
    lines not counted), so an id still names its row after sorting. Rows with 0 context or 0
    generated tokens are skipped and counted in `Trace.num_skipped`.

    Raises:
        WorkloadError: `"<path>:<line>: ..."` for a missing header, a row with the wrong number
            of columns, a non-integer or negative count, or a bad timestamp.
    """
    path = Path(path)
    lines = _read_lines(path)
    rows: list[tuple[int, float, int, int, int]] = []  # (day, seconds, row index, prompt, output)
    columns: tuple[int, int, int] | None = None
    width = 0
    ordinals: dict[str, int] = {}
    num_skipped = 0
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            if columns is None:
                columns = _azure_header(fields)
                width = len(fields)
                continue
            if len(fields) != width:
                raise _RowError(f"expected {width} columns, got {len(fields)}")
            day, seconds = _parse_timestamp(fields[columns[0]].strip(), ordinals)
            prompt = _parse_count(fields[columns[1]].strip(), AZURE_COLUMNS[1])
            output = _parse_count(fields[columns[2]].strip(), AZURE_COLUMNS[2])
        except _RowError as exc:
            raise _fail(path, line_no, str(exc)) from None
        if prompt < 1 or output < 1:
            num_skipped += 1
            continue
        rows.append((day, seconds, len(rows) + num_skipped, prompt, output))
    if columns is None:
        raise _fail(path, 1, f"empty file, expected header {','.join(AZURE_COLUMNS)}")
    rows.sort(key=lambda row: (row[0], row[1]))
    first_day, first_seconds = (rows[0][0], rows[0][1]) if rows else (0, 0.0)
    stem = path.stem
    requests = [
        Request(
            request_id=f"{stem}-{i:06d}",
            prompt_len=p,
            output_len=o,
            arrival_time=(day - first_day) * 86400.0 + (seconds - first_seconds),
        )
        for day, seconds, i, p, o in rows
    ]
    return Trace(requests=requests, source=str(path), num_skipped=num_skipped)


class _MooncakeRow(msgspec.Struct):
    timestamp: float  # ms since the first request
    input_length: int
    output_length: int
    hash_ids: list[int] = msgspec.field(default_factory=list)


def load_mooncake_jsonl(path: str | Path) -> Trace:
    """Load a Mooncake FAST'25 JSON-lines trace.

    Each line becomes a request with `arrival_time = timestamp / 1000`, `prefix_block_ids =
    tuple(hash_ids)` and `prefix_block_size = 512`. Blank lines are ignored; unknown keys are
    ignored. Ids are `<file stem>-<row index>` as in `load_azure_csv`; rows with 0 input or
    output length are skipped and counted.

    Raises:
        WorkloadError: `"<path>:<line>: ..."` for a line that is not a JSON object with the
            expected keys and types, or with negative lengths or timestamp.
    """
    path = Path(path)
    try:
        raw_lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise WorkloadError(f"{path}: trace file not found") from None
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read: {exc}") from None
    decoder = msgspec.json.Decoder(_MooncakeRow)
    stem = path.stem
    requests: list[Request] = []
    num_skipped = 0
    for line_no, line in enumerate(raw_lines, start=1):
        if not line.strip():
            continue
        try:
            row = decoder.decode(line)
        except msgspec.DecodeError as exc:
            raise _fail(path, line_no, f"bad JSON row: {exc}") from None
        if row.timestamp < 0 or row.input_length < 0 or row.output_length < 0:
            raise _fail(path, line_no, "timestamp, input_length and output_length must be >= 0")
        if row.input_length < 1 or row.output_length < 1:
            num_skipped += 1
            continue
        requests.append(
            Request(
                request_id=f"{stem}-{len(requests) + num_skipped:06d}",
                prompt_len=row.input_length,
                output_len=row.output_length,
                arrival_time=row.timestamp / 1000.0,
                prefix_block_ids=tuple(row.hash_ids),
                prefix_block_size=MOONCAKE_BLOCK_SIZE,
            )
        )
    requests.sort(key=lambda r: r.arrival_time)
    return Trace(requests=requests, source=str(path), num_skipped=num_skipped)
