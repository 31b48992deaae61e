"""Simulator fidelity: the same workload on real vLLM CPU engines and in `prescient simulate`.

1. **Replay** a workload, arrivals and lengths shaped like the Azure conversation trace and
   scaled to what the tiny CPU engines serve, through a Prescient gateway on `--engines` real
   engines (one per core), streaming; record each request's TTFT and TPOT at the client, and
   at the engines every step and finished request (the stat-logger plugin's step trace,
   `PRESCIENT_STEP_TRACE`: each step's output timestamp from the engine core, so its period).
2. **Fit** (`--write-preset`) the preset `tiny-llama-cpu` to a calibration replay of the
   trace's next `--requests` requests on the same engines minutes before: the step table and
   the decodes' context cost by least squares over the steps the engines ran back to back, and
   the serving path (HTTP, gateway, API server) from each request's TTFT at the client minus
   at the engine core. Stored in `src/prescient/data/preset_tiny-llama-cpu.json`.
3. **Simulate** the compared requests on as many `tiny-llama-cpu` instances with the same
   policy, and compare the TTFT and TPOT distributions at the client (p50, p90, p99; goal:
   medians within 5%, p99 within 15%) and at the engine core, with a CDF plot (`--plot`).

    .venv/bin/python bench/vllm_fidelity.py --write-preset --engines 1 --rate-scale 0.5 \
        --requests 300 --plot bench/results/vllm_fidelity_1engine.png
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
from tests.live.harness import child, free_port  # noqa: E402
from tests.live.vllm.engine import (  # noqa: E402
    MODEL,
    VllmEngine,
    ahead_of_the_engines,
    vllm_venv,
)

from prescient.config.presets import PRESET_DIR, get_preset  # noqa: E402
from prescient.config.scheduler import SchedulerSettings  # noqa: E402
from prescient.model import Request  # noqa: E402
from prescient.sim.cluster import InstanceSpec, SimSettings, simulate  # noqa: E402
from prescient.sim.traces import load_trace  # noqa: E402

# the step table's candidate rows (scheduled tokens); a row keeps only with this many steps'
# weight around it in the replay it is fitted to
KNOTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048)
MIN_SUPPORT = 5.0
PRESET = "tiny-llama-cpu"
PRESET_FILE = PRESET_DIR / f"preset_{PRESET}.json"
MAX_PROMPT, MAX_OUTPUT = 1500, 256


class Stream(NamedTuple):
    """One streamed completion's client-side timings, s."""

    ttft: float
    gaps: list[float]  # between tokens
    sent: float  # time.monotonic() when sent: the engines' step traces use that clock

    @property
    def tpot(self) -> float | None:
        return statistics.fmean(self.gaps) if self.gaps else None


async def stream(http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int,
                 request_id: str = "") -> Stream:
    """Stream one completion; token arrival times at the client."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    headers = {"x-request-id": request_id} if request_id else {}
    sent, start = time.monotonic(), time.perf_counter()
    times: list[float] = []
    async with http.post(url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        buffer = b""
        async for data in r.content.iter_any():
            now = time.perf_counter()
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: {") and b'"text"' in event:
                    times.append(now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return Stream(times[0] - start, gaps, sent)


def tokens_of(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 1400) for _ in range(n)]


# ---- 1. the engines' step traces, and a preset fitted from them ------------------------------


@dataclasses.dataclass
class EngineTrace:
    """What one engine's `PRESCIENT_STEP_TRACE` (`prescient_vllm.trace`) recorded in a replay."""

    steps: list[dict[str, Any]]
    finished: dict[str, dict[str, Any]]  # by the client's x-request-id

    def __post_init__(self) -> None:
        self._timed = [s for s in self.steps if s["t"] is not None]
        self._stamps = [s["t"] for s in self._timed]

    @classmethod
    def read(cls, path: Path, offset: int = 0) -> EngineTrace:
        """The lines appended after byte `offset`."""
        with open(path, "rb") as f:
            f.seek(offset)
            lines = [json.loads(line) for line in f.read().splitlines()]
        finished = {}
        for line in lines:
            if "request" in line:  # vLLM's id for x-request-id R is "cmpl-R-<choice>"
                finished[re.sub(r"-\d+$", "", line["request"].removeprefix("cmpl-"))] = line
        return cls([line for line in lines if "model_ms" in line], finished)

    def busy_steps(self) -> np.ndarray:
        """(scheduled tokens, decode context tokens, period ms, model ms) of every step the
        engine ran straight after another (the one before left requests running or waiting):
        the step's period is then the gap between the two steps' output timestamps."""
        rows = [(cur["prefill_tokens"] + cur["decodes"], cur["decode_context"],
                 (cur["t"] - prev["t"]) * 1e3, cur["model_ms"])
                for prev, cur in itertools.pairwise(self.steps)
                if prev["t"] is not None and cur["t"] is not None
                and prev["running"] + prev["waiting"] > 0]
        return np.array(rows, dtype=np.float64).reshape(-1, 4)

    def idle_at(self, when: float) -> bool:
        """Whether the engine had nothing to run at `when` (time.monotonic())."""
        i = bisect.bisect_right(self._stamps, when)
        return i == 0 or self._timed[i - 1]["running"] + self._timed[i - 1]["waiting"] == 0

    def engine_ttft(self, request_id: str) -> float | None:
        """A request's TTFT in s as the engine core timed it, from queued to first token. One
        that reaches a busy engine is queued only when the running step ends: this leaves
        that wait out."""
        done = self.finished.get(request_id)
        return None if done is None else done["queued_s"] + done["prefill_s"]


def _hat_basis(tokens: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """The table's linear interpolation as a matrix: row i weighs each knot's period in the
    period of a step of tokens[i] tokens (so a least-squares fit yields the table's rows)."""
    idx = np.clip(np.searchsorted(knots, tokens, side="right") - 1, 0, len(knots) - 2)
    w = np.clip((tokens - knots[idx]) / (knots[idx + 1] - knots[idx]), 0.0, 1.0)
    basis = np.zeros((len(tokens), len(knots)))
    rows = np.arange(len(tokens))
    basis[rows, idx] = 1 - w
    basis[rows, idx + 1] += w
    return basis


def _non_decreasing(values: np.ndarray, weights: np.ndarray) -> list[float]:
    """Weighted isotonic regression (pool adjacent violators): a step of more tokens is never
    faster, and where the fit says otherwise its neighbours are averaged, not maximised."""
    blocks: list[list[float]] = []  # [value, weight, rows]
    for v, w in zip(values, weights, strict=True):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [v for v, _, n in blocks for _ in range(int(n))]


def fit_steps(busy: np.ndarray) -> tuple[list[int], list[float], float]:
    """The step table (knots, periods in ms) and c_kv (ms per decode per context token) that
    best explain the busy steps' periods in least squares (the simulator's step model is
    that table interpolated plus c_kv x the decodes' context). Least squares fits the mean
    period, which a stream's mean token gap averages (trimming outliers made TPOT 4% short).
    Knots without `MIN_SUPPORT` steps' weight nearby are dropped."""
    tokens, context, period = busy[:, 0], busy[:, 1], busy[:, 2]
    top = float(tokens.max())
    knots = np.array([k for k in KNOTS if k < top] + [top])
    while len(knots) > 2:
        support = _hat_basis(tokens, knots).sum(axis=0)
        if support.min() >= MIN_SUPPORT:
            break
        knots = np.delete(knots, int(np.argmin(support)))
    basis = _hat_basis(tokens, knots)
    coef = np.linalg.lstsq(np.column_stack([basis, context]), period, rcond=None)[0]
    if coef[-1] < 0:  # context cannot make a step faster
        coef = np.append(np.linalg.lstsq(basis, period, rcond=None)[0], 0.0)
    ms = _non_decreasing(coef[:-1], basis.sum(axis=0))
    return [round(float(k)) for k in knots], ms, float(coef[-1])


def fit_preset(run: LiveReplay) -> dict[str, object]:
    """A `tiny-llama-cpu` preset from a replay: the step table and c_kv from every engine's
    busy steps, and the serving path (HTTP, gateway, API server: a request reaches its engine
    this much later in the simulator) from each request's TTFT at the client minus at the
    engine core.

    vLLM queues a request that reaches a busy engine only when the running step ends, a wait
    the simulator has of its own: the serving path proper is the median gap of the requests
    sent while their engine idled, and what a busy engine adds to it (its frontend shares the
    CPU with the steps) is the busy requests' median gap less that and less the mean wait for
    the step in flight (E[p^2] / 2E[p] over the step periods p: a request more likely lands
    in a long step)."""
    busy = np.concatenate([t.busy_steps() for t in run.traces])
    knots, ms, c_kv = fit_steps(busy)
    gaps: dict[bool, list[float]] = {True: [], False: []}  # by "the engine idled when sent"
    for rid, stream in run.streams.items():
        for trace in run.traces:
            if (ttft := trace.engine_ttft(rid)) is not None:
                gaps[trace.idle_at(stream.sent)].append((stream.ttft - ttft) * 1e3)
    serving = statistics.median(gaps[True])
    periods = busy[:, 2]
    in_flight = float((periods ** 2).mean() / (2 * periods.mean()))
    busy_extra = statistics.median(gaps[False]) - serving - in_flight if gaps[False] else 0.0
    overhead = float(np.median(periods - busy[:, 3]))
    return {"tokens": knots, "ms": [round(y, 4) for y in ms], "c_seq": 0.0,
            "c_kv": round(c_kv, 8), "step_overhead_ms": round(overhead, 4),
            "frontend_ms": round(max(serving, 0.0), 4),
            "frontend_busy_ms": round(max(busy_extra, 0.0), 4),
            "source": "bench/vllm_fidelity.py --write-preset: vLLM 0.32 CPU, one core per "
                      f"engine, behind a lite gateway, fitted to {len(busy)} busy steps and "
                      f"{len(gaps[True])} + {len(gaps[False])} requests (sent to an idle + a "
                      f"busy engine) of a replay, {time.strftime('%Y-%m-%d')}"}


# ---- 2. the workload, live ------------------------------------------------------------------


def workload(n: int, rate_scale: float, skip: int = 0) -> list[Request]:
    """`n` requests of the bundled Azure conversation trace after its first `skip`, arrivals
    `rate_scale`x faster from 0, prompts clipped to MAX_PROMPT and outputs to MAX_OUTPUT tokens
    (the tiny engines' 2048-token context)."""
    trace = load_trace("azure-conv").requests[skip:skip + n]
    t0 = trace[0].arrival_time
    return [msgspec.structs.replace(
        r, arrival_time=(r.arrival_time - t0) / rate_scale,
        prompt_len=min(r.prompt_len, MAX_PROMPT), output_len=min(r.output_len, MAX_OUTPUT))
        for r in trace]


async def replay(url: str, requests: list[Request]) -> dict[str, Stream]:
    """Send each request at its arrival time (streamed, token-id prompt); client timings."""
    rng = random.Random(5)
    prompts = {r.request_id: tokens_of(rng, r.prompt_len) for r in requests}
    out: dict[str, Stream] = {}
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        start = time.perf_counter()

        async def one(r: Request) -> None:
            await asyncio.sleep(max(0.0, start + r.arrival_time - time.perf_counter()))
            out[r.request_id] = await stream(http, url, prompts[r.request_id], r.output_len,
                                             request_id=r.request_id)

        await asyncio.gather(*(one(r) for r in requests))
    return out


def gateway(engines: list[VllmEngine], port: int, work: Path, venv: Path
            ) -> AbstractContextManager[object]:
    """A lite-mode gateway (embedded load-balance) in front of `engines`, on `port`."""
    return child(["gateway", "--host", "127.0.0.1", "--port", str(port),
                  "--enable-full-mode-scheduling=false", "--llm-backend-endpoints",
                  ",".join(e.address for e in engines), "--served-model-name", MODEL,
                  "--tokenizer-path", str(venv / MODEL)], port=port,
                 log=work / f"gateway-{port}.log")


class LiveReplay(NamedTuple):
    streams: dict[str, Stream]  # the client's timings, by request id
    traces: list[EngineTrace]  # each engine's steps and finished requests


def live_run(venv: Path, work: Path, windows: list[list[Request]], n_engines: int,
             direct: bool = False) -> list[LiveReplay]:
    """Each window of requests replayed in turn on the same `n_engines` real engines (one per
    core) behind a lite gateway, or `direct` to the one engine. Engines that take every core
    each keep all their processes on their worker's core: unconfined, an engine's API server
    and engine core compete with the other engine's worker, whose steps then stall for up
    to seconds (two engines on two cores: TTFT p99 1.7 s, against 85 ms confined)."""
    confine = n_engines >= len(os.sched_getaffinity(0))
    engines = [VllmEngine(venv, free_port(), core, work, confine=confine)
               for core in range(n_engines)]
    traces = [e.step_trace for e in engines]
    port = free_port()
    try:
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready()
        with (ahead_of_the_engines(engines),
              contextlib.nullcontext() if direct else gateway(engines, port, work, venv)):
            url = engines[0].url if direct else f"http://127.0.0.1:{port}"
            asyncio.run(replay(url, windows[0][:8]))  # warm-up: connections, first steps
            out = []
            for window in windows:
                offsets = [path.stat().st_size for path in traces]
                streams = asyncio.run(replay(url, window))
                time.sleep(0.5)  # the API servers trace a step just after its tokens leave
                out.append(LiveReplay(streams, [EngineTrace.read(path, offset) for path, offset
                                                in zip(traces, offsets, strict=True)]))
            return out
    finally:
        for e in engines:
            e.stop()


# ---- 3. the same workload, simulated --------------------------------------------------------


def sim_run(requests: list[Request], n_engines: int
            ) -> dict[str, tuple[float | None, float | None]]:
    """(TTFT, TPOT) per request on n x tiny-llama-cpu, the gateway's lite load-balance."""
    instances = [InstanceSpec(instance_id=f"vllm-{i}", preset=PRESET, max_num_seqs=128,
                              max_num_batched_tokens=2048) for i in range(n_engines)]
    settings = SimSettings(scheduler=SchedulerSettings(enable_full_mode_scheduling=False))
    result = simulate(requests, instances, "load-balance", settings)
    return {r.request_id: (r.ttft, r.tpot) for r in result.records}


def step_report(traces: list[EngineTrace]) -> None:
    """The replay's busy steps against the preset's step model, by scheduled tokens."""
    model = get_preset(PRESET).model
    busy = np.concatenate([t.busy_steps() for t in traces])
    predicted = np.array([model.step_time(int(n), 0.0, 0, int(c)) * 1e3
                          for n, c in busy[:, :2]])
    print(f"replay: {len(busy)} busy steps; step period by scheduled tokens (ms)")
    print("  tokens       steps  real mean  preset mean  real p50  model time p50")
    for lo, hi in itertools.pairwise((*KNOTS, 10**9)):
        mask = (busy[:, 0] >= lo) & (busy[:, 0] < hi)
        if mask.any():
            print(f"  {lo:>5}-{hi if hi < 10**9 else '':<5} {int(mask.sum()):>6} "
                  f"{busy[mask, 2].mean():10.2f} {predicted[mask].mean():12.2f} "
                  f"{np.median(busy[mask, 2]):9.2f} {np.median(busy[mask, 3]):15.2f}")


def quantiles(values: list[float]) -> tuple[float, float, float]:
    arr = np.array(values)
    return (float(np.percentile(arr, 50)), float(np.percentile(arr, 90)),
            float(np.percentile(arr, 99)))


Timings = dict[str, tuple[float | None, float | None]]  # (TTFT, TPOT) s by request id


def compare(live: Timings, sims: dict[str, Timings], plot: str | None, n_engines: int
            ) -> None:
    """Real against simulated TTFT and TPOT at the client, for each simulation in `sims`."""
    def values(timings: Timings, i: int) -> list[float]:
        return [v[i] for v in timings.values() if v[i] is not None]

    print("metric  source                    p50 ms   p90 ms   p99 ms")
    for i, metric in enumerate(("TTFT", "TPOT")):
        rq = quantiles(values(live, i))
        print(f"{metric}    vLLM                   {rq[0] * 1e3:8.2f} {rq[1] * 1e3:8.2f} "
              f"{rq[2] * 1e3:8.2f}")
        for label, sim in sims.items():
            sq = quantiles(values(sim, i))
            med, tail = sq[0] / rq[0] - 1, sq[2] / rq[2] - 1
            print(f"{metric}    {label:22s} {sq[0] * 1e3:8.2f} {sq[1] * 1e3:8.2f} "
                  f"{sq[2] * 1e3:8.2f}   sim/real {med:+6.1%} {sq[1] / rq[1] - 1:+6.1%} "
                  f"{tail:+6.1%}: median {'MET' if abs(med) <= 0.05 else 'NOT MET'} (5%), p99 "
                  f"{'MET' if abs(tail) <= 0.15 else 'NOT MET'} (15%)")
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for i, (ax, metric) in enumerate(zip(axes, ("TTFT", "TPOT"), strict=True)):
            curves = {f"vLLM CPU ({n_engines} engine(s))": live} | {
                f"simulated, {label}": sim for label, sim in sims.items()}
            for label, timings in curves.items():
                xs = np.sort(np.array(values(timings, i)) * 1e3)
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
            ax.set_xscale("log")
            ax.set_xlabel(f"{metric} (ms)")
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


# a sleeper: 5 ms sleeps on one core, in the normal or the real-time class; prints its gaps
_SLEEPER = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
if sys.argv[2] == "real-time":
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
gaps, last = [], time.perf_counter()
while True:
    time.sleep(0.005)
    now = time.perf_counter()
    gaps.append(now - last)
    last = now
    if len(gaps) % 200 == 0:
        print(max(gaps) * 1e3, sorted(gaps)[int(len(gaps) * 0.99)] * 1e3, flush=True)
"""


def measure_starvation(venv: Path, work: Path, requests: list[Request]) -> None:
    """How long a process that wants the CPU for a moment waits beside a busy vLLM CPU engine:
    5 ms sleepers on each core, normal and real-time class, while one engine serves the replay
    (its client real-time, as in the comparison)."""
    engine = VllmEngine(venv, free_port(), 0, work)
    engine.start()
    try:
        engine.wait_ready()
        sleepers = {(core, kind): subprocess.Popen(
            [sys.executable, "-c", _SLEEPER, str(core), kind], stdout=subprocess.PIPE, text=True)
            for core in sorted(os.sched_getaffinity(0)) for kind in ("normal", "real-time")}
        try:
            with ahead_of_the_engines([engine]):
                asyncio.run(replay(engine.url, requests))
        finally:
            for proc in sleepers.values():
                proc.terminate()
        for (core, kind), proc in sleepers.items():
            last = (proc.communicate()[0].strip().splitlines() or ["nan nan"])[-1].split()
            print(f"core {core}, {kind:9s}: longest wait {float(last[0]):8.1f} ms, p99 "
                  f"{float(last[1]):6.1f} ms (a 5 ms sleep loop)")
    finally:
        engine.stop()


def to_json(requests: list[Request], run: LiveReplay) -> dict[str, object]:
    """One replay as `--dump` stores it: each request's lengths and client timings, and the
    engines' traces (what `--resimulate` needs to refit and simulate again)."""
    rows = [{"id": r.request_id, "arrival": r.arrival_time, "prompt": r.prompt_len,
             "output": r.output_len, "ttft": run.streams[r.request_id].ttft,
             "tpot": run.streams[r.request_id].tpot, "sent": run.streams[r.request_id].sent}
            for r in requests]
    return {"requests": rows, "traces": [{"steps": t.steps, "finished": t.finished}
                                          for t in run.traces]}


def from_json(data: dict[str, Any]) -> tuple[list[Request], LiveReplay]:
    rows = data["requests"]
    requests = [Request(request_id=r["id"], prompt_len=r["prompt"], output_len=r["output"],
                        arrival_time=r["arrival"]) for r in rows]
    streams = {r["id"]: Stream(r["ttft"], [r["tpot"]] if r["tpot"] is not None else [],
                               r["sent"]) for r in rows}
    return requests, LiveReplay(streams, [EngineTrace(**t) for t in data["traces"]])


def write_preset(run: LiveReplay) -> None:
    fitted = fit_preset(run)
    PRESET_FILE.write_text(json.dumps(fitted, indent=1) + "\n")
    print(f"wrote {PRESET_FILE}: step periods {fitted['ms']} ms at {fitted['tokens']} tokens "
          f"(loop overhead over the model time {fitted['step_overhead_ms']:.2f} ms), "
          f"{fitted['c_kv'] * 1e3:.3f} us per decode per context token, serving path "
          f"{fitted['frontend_ms']:.2f} ms per request, {fitted['frontend_busy_ms']:.2f} ms "
          "more when the engine is busy")


def evaluate(replays: list[tuple[list[Request], LiveReplay]], args: argparse.Namespace
             ) -> None:
    """The last replay against the simulator. With `--write-preset`, twice: with the preset
    fitted to the calibration replay before it (held out: the machine's speed drifts between
    the two), then with one fitted to the compared replay's own steps (kept in the file)."""
    requests, run = replays[-1]
    print(f"{len(requests)} requests of azure-conv, rate x{args.rate_scale:g}, prompts <= "
          f"{MAX_PROMPT}, outputs <= {MAX_OUTPUT}; lite load-balance over {args.engines} "
          "engine(s)")
    sims = {}
    if args.write_preset:
        before, now = (np.concatenate([t.busy_steps() for t in r.traces])
                       for r in (replays[0][1], run))
        ratio = now[now[:, 0] < 4, 2].mean() / before[before[:, 0] < 4, 2].mean()
        print(f"drift: 1-3 token steps ran {ratio - 1:+.1%} longer on average in the compared "
              "replay than in the calibration replay")
        write_preset(replays[0][1])
        sims["held-out fit"] = sim_run(requests, args.engines)
        write_preset(run)
        sims["same-replay fit"] = sim_run(requests, args.engines)
    else:
        sims["preset"] = sim_run(requests, args.engines)
    live = {rid: (s.ttft, s.tpot) for rid, s in run.streams.items()}
    compare(live, sims, args.plot or None, args.engines)
    step_report(run.traces)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-preset", action="store_true",
                        help=f"first replay the next --requests requests of the trace, fit "
                             f"preset {PRESET} to it and store it, then compare")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate-scale", type=float, default=2.0)
    parser.add_argument("--engines", type=int, choices=(1, 2), default=2,
                        help="real engines (one per core) and simulated instances")
    parser.add_argument("--plot", default="", help="write the CDF plot here (PNG)")
    parser.add_argument("--dump", default="",
                        help="write the replays (requests, client timings, engine traces) here "
                             "(JSON)")
    parser.add_argument("--resimulate", default="", metavar="DUMP",
                        help="no engines: compare a --dump file's last replay with the "
                             "simulator again (with --write-preset, refitting the preset to "
                             "its calibration replay first)")
    parser.add_argument("--starvation", action="store_true",
                        help="only measure how long processes beside one busy engine wait for "
                             "the CPU (normal vs real-time class) during the replay")
    parser.add_argument("--direct", action="store_true",
                        help="replay straight to the engine, without a gateway (--engines 1)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.resimulate:
        dump = json.loads(Path(args.resimulate).read_text())
        replays = [from_json(d) for d in dump["replays"]]
        args.rate_scale, args.engines = dump["rate_scale"], dump["engines"]
        if args.write_preset and len(replays) < 2:
            sys.exit(f"--write-preset: {args.resimulate} holds no calibration replay")
        evaluate(replays, args)
        return
    venv = vllm_venv()
    requests = workload(args.requests, args.rate_scale)
    windows = [requests]
    if args.write_preset:  # calibrate on the trace's next requests, then compare on these
        windows.insert(0, workload(args.requests, args.rate_scale, skip=args.requests))
    with tempfile.TemporaryDirectory(prefix="pvf-") as d:
        work = Path(d)
        if args.starvation:
            measure_starvation(venv, work, requests)
            return
        runs = live_run(venv, work, windows, args.engines, args.direct)
    if args.dump:
        Path(args.dump).write_text(json.dumps({
            "rate_scale": args.rate_scale, "engines": args.engines,
            "replays": [to_json(w, r) for w, r in zip(windows, runs, strict=True)]}))
    evaluate(list(zip(windows, runs, strict=True)), args)


if __name__ == "__main__":
    main()
