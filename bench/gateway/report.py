"""Tables of the gateway-overhead benchmark, in the layout of shared/reference/router-bench.md.

Each measurement is repeated; every cell is the median over repeats of one setup/test/load.
"Added" latency is a setup's percentile minus direct's at the same rate and mode, so it is only
shown when direct ran. Ratios compare setups measured in this same run, never across runs.
"""

from __future__ import annotations

import platform
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SSE_WRITES = 17  # 16 events + [DONE]: what "per SSE event" divides by (router-bench §3.4)
PEERS = ("vllm-router-1c", "sglang-router-1c")

# Copied from shared/reference/router-bench.md §1 (production-stack is not on PyPI, so it is
# not re-measured here); same columns as `headline()`.
REFERENCE_ROWS = (
    ("production-stack router (Python, as shipped: asyncio + h11)", "841 / 448", "415 / 488",
     "1,207 / 2,416", "36.9 / 279 (89 % CPU)", "11.7 / 353", "100 (saturated; 671 req/s) / 1,240"),
    ("production-stack router + uvloop + httptools", "907 / 443 (wrk timeouts at c256)",
     "561 / 432", "1,114 / 1,810", "1.57 / 149", "110 / 2,710", "–"),
)
# router-bench.md §3.1: vllm-router-1c's non-stream c64 req/s there, a gauge of this machine.
REFERENCE_VLLM_NS_C64 = 21_101

# router-bench.md §1, "goal numbers this supports, for one core of this machine".
GOALS = (
    ("proxy CPU per non-stream request (c64) <= 50 µs", "us_ns", 50.0),
    ("proxy CPU per forwarded SSE event (512 slow streams) <= 27 µs", "us_event", 27.0),
    ("added latency @500 req/s, non-stream p50 <= 0.5 ms", "add_ns_p50", 0.5),
    ("added latency @500 req/s, non-stream p99 <= 1 ms", "add_ns_p99", 1.0),
    ("added latency @500 req/s, stream p50 <= 0.5 ms", "add_s_p50", 0.5),
    ("added latency @500 req/s, stream p99 <= 1 ms", "add_s_p99", 1.0),
)


# ---- numbers -------------------------------------------------------------------------------


def derived(run: Any) -> dict[str, float | None]:
    """The numbers of one run that the tables show."""
    r = run.result
    cpu = run.proxy_cpu_s
    out: dict[str, float | None] = {
        "errors": float(r["errors"]),
        "cpu_pct": None if cpu is None else 100.0 * cpu / run.wall_s,
        "c0": 100.0 * run.busy.get(0, 0.0), "c1": 100.0 * run.busy.get(1, 0.0),
    }
    if run.test == "open":
        out.update(p50=r["p50_ms"], p99=r["p99_ms"], ttfb50=r["ttfb_p50_ms"],
                   ttfb99=r["ttfb_p99_ms"], lag=r["max_send_lag_ms"])
    else:
        done = r["requests"]
        out.update(rps=r["rps"], p50=r["p50_us"] / 1e3, p90=r["p90_us"] / 1e3,
                   p99=r["p99_us"] / 1e3,
                   us_req=None if cpu is None or not done else 1e6 * cpu / done)
    return out


class Medians:
    """Median over repeats of each derived number, per (setup, test, mode, load)."""

    def __init__(self, runs: Iterable[Any]) -> None:
        groups: dict[tuple[str, str, str, float], list[dict[str, float | None]]] = (
            defaultdict(list))
        for run in runs:
            groups[(run.setup, run.test, run.mode, run.load)].append(derived(run))
        self._m = {k: _median_dicts(v) for k, v in groups.items()}

    def get(self, setup: str, test: str, mode: str, load: float, key: str) -> float | None:
        return self._m.get((setup, test, mode, load), {}).get(key)

    def added(self, setup: str, mode: str, rate: float, key: str) -> float | None:
        mine, base = (self.get(setup, "open", mode, rate, key),
                      self.get("direct", "open", mode, rate, key))
        return None if mine is None or base is None else mine - base


def _median_dicts(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    keys = {k for row in rows for k in row}
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [row[k] for row in rows if row.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None  # type: ignore[type-var]
    return out


# ---- cells ---------------------------------------------------------------------------------


def n0(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def f1(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def f2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def f3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def pair(a: str, b: str) -> str:
    return f"{a} / {b}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---- progress ------------------------------------------------------------------------------


def run_line(run: Any) -> str:
    """One measurement, printed as soon as it is done."""
    d = derived(run)
    cpu = "" if d["cpu_pct"] is None else f", proxy {d['cpu_pct']:.1f}% CPU"
    busy = f", c0/c1 busy {d['c0']:.0f}/{d['c1']:.0f}%"
    if run.test == "open":
        return (f"open {run.mode} @{run.load:g}/s: p50 {f3(d['p50'])} / p99 {f3(d['p99'])} ms, "
                f"ttfb p50 {f3(d['ttfb50'])} / p99 {f3(d['ttfb99'])} ms{cpu}{busy}, "
                f"errors {d['errors']:.0f}, max send lag {d['lag']:.1f} ms")
    us = "" if d["us_req"] is None else f", {d['us_req']:.0f} µs/req"
    return (f"{run.test} {run.mode} c{run.load:g}: {n0(d['rps'])} req/s, p50 {f2(d['p50'])} / "
            f"p99 {f2(d['p99'])} ms{cpu}{us}{busy}, errors {d['errors']:.0f}")


def preamble(plan: Any, names: Sequence[str], versions: dict[str, str], log_dir: Path,
             *, quick: bool) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    lines = [
        "# Gateway overhead",
        f"machine: {platform.node()} {platform.machine()}, {cpu}, kernel {platform.release()}, "
        f"Python {sys.version.split()[0]}",
        "peers: " + (", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "none"),
        f"setups: {', '.join(names)}",
        f"closed loop: wrk -t1, c{'/'.join(map(str, plan.conns))}, {plan.seconds:g} s; "
        f"open loop: {'/'.join(f'{r:g}' for r in plan.rates)} req/s, {plan.open_seconds:g} s "
        f"after {plan.open_warmup:g} s warm-up; slow streams: "
        f"{'c512, ' + format(plan.slow_seconds, 'g') + ' s' if plan.slow else 'off'}; "
        f"repeats: {plan.repeats} (cells are medians)",
        f"logs: {log_dir}",
    ]
    if quick:
        lines.append("--quick: a smoke check (every setup starts, serves and is measured); "
                     "its numbers are not results")
    return "\n".join(lines) + "\n"


# ---- tables --------------------------------------------------------------------------------


def headline(m: Medians, setups: Sequence[str], plan: Any) -> str:
    c = plan.conns[:2]
    rate = plan.rates[0]
    cs = " / ".join(f"c{x}" for x in c)
    header = ["setup", f"non-stream req/s {cs}", f"stream(16 ev) req/s {cs}",
              f"proxy CPU µs per req, ns / stream (c{c[0]})",
              f"added latency @{rate:g} req/s, non-stream p50 / p99 ms",
              f"added latency @{rate:g} req/s, stream (to [DONE]) p50 / p99 ms",
              "512 slow streams (16 ev × 20 ms): proxy CPU % / p99 ms"]
    rows = []
    for s in setups:
        rows.append([
            s, " / ".join(n0(m.get(s, "closed", "ns", x, "rps")) for x in c),
            " / ".join(n0(m.get(s, "closed", "s", x, "rps")) for x in c),
            pair(n0(m.get(s, "closed", "ns", c[0], "us_req")),
                 n0(m.get(s, "closed", "s", c[0], "us_req"))),
            _added_cell(m, s, "ns", rate), _added_cell(m, s, "s", rate),
            pair(n0(m.get(s, "slow", "s", 512, "cpu_pct")),
                 n0(m.get(s, "slow", "s", 512, "p99"))),
        ])
    for row in REFERENCE_ROWS:
        rows.append([f"{row[0]} *(from shared/reference/router-bench.md, not re-measured)*",
                     *row[1:]])
    return table(header, rows)


def _added_cell(m: Medians, s: str, mode: str, rate: float) -> str:
    if s == "direct":
        return (f"0 (abs {f3(m.get(s, 'open', mode, rate, 'p50'))} / "
                f"{f3(m.get(s, 'open', mode, rate, 'p99'))})")
    return pair(f2(m.added(s, mode, rate, "p50")), f2(m.added(s, mode, rate, "p99")))


def closed_loop(m: Medians, setups: Sequence[str], plan: Any) -> str:
    c = plan.conns
    c0 = c[0]
    header = (["setup"] + [f"{md} c{x} rps" for md in ("ns", "s") for x in c]
              + [f"ns c{c0} p50/p99 ms", f"s c{c0} p50/p99 ms",
                 f"proxy cpu% (ns / s c{c0})",
                 "proxy µs/req (" + " / ".join(f"{md} c{x}" for x in c for md in ("ns", "s")) + ")",
                 f"c0/c1 busy% ns c{c0}", f"c0/c1 busy% s c{c0}", "errors"])
    rows = []
    for s in setups:
        g = lambda md, x, k, s=s: m.get(s, "closed", md, x, k)  # noqa: E731
        errs = sum(g(md, x, "errors") or 0 for md in ("ns", "s") for x in c)
        rows.append([s] + [n0(g(md, x, "rps")) for md in ("ns", "s") for x in c] + [
            pair(f2(g("ns", c0, "p50")), f2(g("ns", c0, "p99"))),
            pair(f2(g("s", c0, "p50")), f2(g("s", c0, "p99"))),
            pair(n0(g("ns", c0, "cpu_pct")), n0(g("s", c0, "cpu_pct"))),
            " / ".join(n0(g(md, x, "us_req")) for x in c for md in ("ns", "s")),
            pair(n0(g("ns", c0, "c0")), n0(g("ns", c0, "c1"))),
            pair(n0(g("s", c0, "c0")), n0(g("s", c0, "c1"))),
            n0(errs),
        ])
    return table(header, rows)


def open_loop(m: Medians, setups: Sequence[str], plan: Any) -> str:
    header = ["setup", "rate", "non-stream p50 / p99", "added p50 / p99", "stream p50 / p99",
              "stream TTFB p50 / p99", "added (stream total) p50 / p99", "proxy cpu% ns / s",
              "errors", "max send lag ms"]
    rows = []
    for s in setups:
        for rate in plan.rates:
            g = lambda md, k, s=s, rate=rate: m.get(s, "open", md, rate, k)  # noqa: E731
            rows.append([
                s, f"{rate:g}", pair(f3(g("ns", "p50")), f3(g("ns", "p99"))),
                pair(f3(m.added(s, "ns", rate, "p50")), f3(m.added(s, "ns", rate, "p99"))),
                pair(f3(g("s", "p50")), f3(g("s", "p99"))),
                pair(f3(g("s", "ttfb50")), f3(g("s", "ttfb99"))),
                pair(f3(m.added(s, "s", rate, "p50")), f3(m.added(s, "s", rate, "p99"))),
                pair(f1(g("ns", "cpu_pct")), f1(g("s", "cpu_pct"))),
                n0((g("ns", "errors") or 0) + (g("s", "errors") or 0)),
                pair(f1(g("ns", "lag")), f1(g("s", "lag"))),
            ])
    return table(header, rows)


def slow_streams(m: Medians, setups: Sequence[str]) -> str:
    header = ["setup", "rps", "p50 ms", "p90 ms", "p99 ms", "proxy cpu%", "proxy µs/req",
              "µs per SSE event", "c0/c1 busy%", "errors"]
    rows = []
    for s in setups:
        g = lambda k, s=s: m.get(s, "slow", "s", 512, k)  # noqa: E731
        us = g("us_req")
        rows.append([s, n0(g("rps")), f1(g("p50")), f1(g("p90")), f1(g("p99")),
                     n0(g("cpu_pct")), n0(us), f1(None if us is None else us / SSE_WRITES),
                     pair(n0(g("c0")), n0(g("c1"))), n0(g("errors"))])
    return table(header, rows)


def facts(fs: dict[str, dict[str, Any]], setups: Sequence[str]) -> str:
    rows = []
    for s in setups:
        f = fs.get(s)
        if f is None:
            continue
        split = f["split"]
        rows.append([s, "–" if s == "direct" else str(f["threads"]),
                     "–" if s == "direct" else f"{f['rss_mb']:.1f}",
                     " / ".join(f"{x:,}" for x in split)])
    return table(["setup", "proxy threads (loaded)", "proxy RSS MB (after the runs)",
                  "backend split (b1 / b2, last repeat)"], rows)


def _metric(m: Medians, s: str, key: str, plan: Any) -> float | None:
    c0, rate = plan.conns[0], plan.rates[0]
    if key == "us_ns":
        return m.get(s, "closed", "ns", c0, "us_req")
    if key == "us_event":
        us = m.get(s, "slow", "s", 512, "us_req")
        return None if us is None else us / SSE_WRITES
    mode, pct = key.split("_")[1:]
    return m.added(s, mode, rate, pct)


def ratios(m: Medians, setups: Sequence[str], plan: Any) -> str:
    ours = [s for s in setups if s.startswith("prescient")]
    peers = [s for s in setups if s in PEERS]
    c, rate = plan.conns, plan.rates[0]
    header = (["ours ÷ peer"] + [f"req/s {md} c{x}" for md in ("ns", "s") for x in c]
              + [f"CPU µs/req ns c{c[0]}", f"CPU µs/req s c{c[0]}", "CPU µs/SSE event (slow)",
                 f"added @{rate:g} ns p50/p99 ms (ours vs peer)",
                 f"added @{rate:g} s p50/p99 ms (ours vs peer)"])
    rows = []
    for o in ours:
        for p in peers:
            def ratio(test: str, md: str, load: float, key: str, o: str = o, p: str = p) -> str:
                a, b = m.get(o, test, md, load, key), m.get(p, test, md, load, key)
                return "-" if a is None or not b else f"{a / b:.2f}"

            def added(md: str, o: str = o, p: str = p) -> str:
                return (f"{f2(m.added(o, md, rate, 'p50'))}/{f2(m.added(o, md, rate, 'p99'))} vs "
                        f"{f2(m.added(p, md, rate, 'p50'))}/{f2(m.added(p, md, rate, 'p99'))}")

            rows.append([f"{o} ÷ {p}"] + [ratio("closed", md, x, "rps") for md in ("ns", "s")
                                          for x in c]
                        + [ratio("closed", "ns", c[0], "us_req"),
                           ratio("closed", "s", c[0], "us_req"),
                           ratio("slow", "s", 512, "us_req"), added("ns"), added("s")])
    if not rows:
        return "(no ratio: needs a prescient setup and a Rust router in the same run)"
    note = ""
    vllm = m.get("vllm-router-1c", "closed", "ns", 64, "rps")
    if vllm:
        note = (f"\n\nMachine gauge: vllm-router-1c non-stream c64 here {vllm:,.0f} req/s, "
                f"{REFERENCE_VLLM_NS_C64:,} in router-bench.md §3.1 "
                f"({vllm / REFERENCE_VLLM_NS_C64:.2f}×); a large gap means a busy or different "
                "machine.")
    return ("req/s: >1 means ours carries more. CPU: <1 means ours costs less per request. "
            "Added latency in ms, ours vs the peer, same run.\n\n" + table(header, rows) + note)


def goals(m: Medians, setups: Sequence[str], plan: Any, *, quick: bool) -> str:
    ours = [s for s in setups if s.startswith("prescient")]
    if not ours:
        return "(no prescient setup ran)"
    rows = []
    for label, key, limit in GOALS:
        cells = []
        for s in ours:
            v = _metric(m, s, key, plan)
            cells.append("-" if v is None else f"{v:.2f} {'MET' if v <= limit else 'NOT MET'}")
        rows.append([label, *cells])
    note = ("\n\n--quick: short noisy runs; verdicts are indicative only." if quick else "")
    return ("Goal numbers from router-bench.md §1 (one core of this machine). Added latency "
            f"is at {plan.rates[0]:g} req/s.\n\n" + table(["goal", *ours], rows) + note)


def render(runs: Sequence[Any], skipped: dict[str, str], fs: dict[str, dict[str, Any]],
           plan: Any, versions: dict[str, str], commands: Sequence[str], *, quick: bool) -> str:
    m = Medians(runs)
    setups = list(dict.fromkeys(r.setup for r in runs))
    parts = ["## 1. Headline (cells: medians over repeats)", headline(m, setups, plan)]
    if skipped:
        parts += ["Skipped or failed:", "\n".join(f"- {k}: {v}" for k, v in skipped.items())]
    if plan.closed:
        parts += [f"## 2. Closed loop (wrk -t1, {plan.seconds:g} s)",
                  closed_loop(m, setups, plan)]
    if plan.open:
        parts += [f"## 3. Fixed-rate latency (open loop, {plan.open_seconds:g} s after "
                  f"{plan.open_warmup:g} s warm-up), ms", open_loop(m, setups, plan)]
    if plan.slow:
        parts += [f"## 4. Slow streams: 512 streams, 16 SSE events 20 ms apart "
                  f"({plan.slow_seconds:g} s)", slow_streams(m, setups)]
    parts += ["## 5. Process facts", facts(fs, setups),
              "## 6. Ratios measured in this run", ratios(m, setups, plan),
              "## 7. Goals", goals(m, setups, plan, quick=quick),
              "## Commands", "\n".join(f"    {c}" for c in commands)]
    return "\n\n".join(parts) + "\n"
