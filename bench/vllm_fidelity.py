"""Simulator fidelity: the same workload on two real vLLM CPU engines and in `prescient simulate`.

1. **Calibrate** a preset for the tiny vLLM CPU engine (`tiny-llama-cpu`) from measured timings
   of one engine behind a gateway, as served: vLLM's own per-step model time
   (`--enable-logging-iteration-details`) binned by scheduled tokens, turned into step periods
   (the table-driven step model: small steps from decode streams' token gaps, prefill-sized ones
   from the model time plus the loop overhead a single decode shows), and the serving path's
   per-request cost (an idle engine's TTFT minus its prefill step: HTTP, gateway, API server).
   `--write-preset` stores them in `src/prescient/data/preset_tiny-llama-cpu.json`.
2. **Replay** one workload, arrivals and lengths shaped like the Azure conversation trace and
   scaled to what the tiny CPU engines serve, through a Prescient gateway on `--engines` real
   engines (one per core), streaming, and record each request's TTFT and TPOT at the client.
3. **Simulate** the same requests on as many `tiny-llama-cpu` instances with the same policy,
   and compare the TTFT and TPOT distributions (p50, p90, p99; goal: medians within 5%, p99
   within 15%), with a CDF plot (`--plot`).

    .venv/bin/python bench/vllm_fidelity.py --write-preset --engines 1 --rate-scale 0.5 \
        --requests 300 --plot bench/results/vllm_fidelity_1engine.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import urllib.request
from contextlib import AbstractContextManager
from pathlib import Path

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

TABLE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# decode calibration: B streams of DECODE_TOKENS tokens, timed over their steady middle (gaps
# 10..-10: a mean of ~48 generated tokens), after short or long prompts; the difference gives
# the cost of a decode's context (the table's c_kv), which short prompts alone cannot show
DECODE_TOKENS, SHORT_PROMPT, LONG_PROMPT = 96, 16, 1024
SHORT_CTX, LONG_CTX = SHORT_PROMPT + 48, LONG_PROMPT + 48
LOADED_DECODES = 3  # streams decoding while the prefill-sized steps are timed, as in a replay
PRESET = "tiny-llama-cpu"
PRESET_FILE = PRESET_DIR / f"preset_{PRESET}.json"
MAX_PROMPT, MAX_OUTPUT = 1500, 256


class Stream:
    """One streamed completion's client-side timings."""

    def __init__(self, ttft: float, gaps: list[float], tokens: int, head: float = 0.0,
                 first_byte: float = 0.0) -> None:
        self.ttft, self.gaps, self.tokens = ttft, gaps, tokens
        self.head = head  # the response head's arrival, seconds after sending
        self.first_byte = first_byte  # the first body bytes' arrival

    @property
    def tpot(self) -> float | None:
        return statistics.fmean(self.gaps) if self.gaps else None


async def stream(http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int,
                 request_id: str = "") -> Stream:
    """Stream one completion; token arrival times at the client."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    headers = {"x-request-id": request_id} if request_id else {}
    start = time.perf_counter()
    times: list[float] = []
    first_byte = 0.0
    async with http.post(url + "/v1/completions", json=body, headers=headers) as r:
        head = time.perf_counter() - start
        assert r.status == 200, await r.text()
        buffer = b""
        async for data in r.content.iter_any():
            now = time.perf_counter()
            first_byte = first_byte or now - start
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: {") and b'"text"' in event:
                    times.append(now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return Stream(times[0] - start, gaps, len(times), head, first_byte)


def steps_since(engine: VllmEngine, offset: int) -> np.ndarray:
    return np.array(engine.steps_since(offset), dtype=np.float64).reshape(-1, 6)


def tokens_of(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 1400) for _ in range(n)]


# ---- 1. calibration ---------------------------------------------------------------------------


async def calibrate(engine: VllmEngine, url: str) -> dict[str, object]:
    """Timings of `engine` as a client sees them through `url` (the gateway in front of it)."""
    rng = random.Random(11)
    async with aiohttp.ClientSession() as http:
        for _ in range(5):  # warm-up
            await stream(http, url, tokens_of(rng, 64), 4)
        offset = engine.log_size()
        # prefill: idle engine, one request at a time, 2 output tokens
        prefill: dict[int, list[float]] = {}
        for p in (16, 64, 256, 512, 1024, 1500):
            for _ in range(5):
                s = await stream(http, url, tokens_of(rng, p), 2)
                prefill.setdefault(p, []).append(s.ttft)
        # the same 64-token prefill after idle spells: what waking the engine costs
        wake = {gap: await ttft_after_idle(http, url, rng, 64, gap, 8) for gap in IDLE_GAPS}
        # decode: B concurrent streams, short prompts, then (fewer) long ones
        async def periods(b: int, prompt: int) -> list[float]:
            runs = await asyncio.gather(*(stream(http, url, tokens_of(rng, prompt),
                                                 DECODE_TOKENS) for _ in range(b)))
            # steady state only; a stream vLLM withheld until its end (all gaps ~0) says nothing
            return [g for s in runs if s.gaps and max(s.gaps) > 1e-4 for g in s.gaps[10:-10]]

        decode = {b: await periods(b, SHORT_PROMPT) for b in (1, 2, 4, 8, 16, 32, 64)}
        decode_long = {b: await periods(b, LONG_PROMPT) for b in (1, 4, 8, 16)}
        # prefill-sized steps as a replay runs them: prompts arriving while others decode
        loaded_offset = engine.log_size()
        background = [asyncio.create_task(stream(http, url, tokens_of(rng, LONG_PROMPT),
                                                 MAX_OUTPUT)) for _ in range(LOADED_DECODES)]
        await asyncio.sleep(0.1)
        for p in (256, 512, 1024, 1500):
            for _ in range(3):
                await stream(http, url, tokens_of(rng, p), 2)
        await asyncio.gather(*background)
    loaded = steps_since(engine, loaded_offset)
    steps = steps_since(engine, offset)[:-len(loaded) or None]
    return {"prefill": prefill, "wake": wake, "decode": decode, "decode_long": decode_long,
            "steps": steps.tolist(), "steps_loaded": loaded.tolist()}


IDLE_GAPS = (0.05, 0.3, 1.0)  # seconds an engine idles before a request (idle wake-up)


async def ttft_after_idle(http: aiohttp.ClientSession, url: str, rng: random.Random,
                          prompt: int, gap: float, n: int) -> list[float]:
    """TTFTs (s) of `n` sequential 2-token requests, each after `gap` s of idling."""
    ttfts = []
    for _ in range(n):
        await asyncio.sleep(gap)
        ttfts.append((await stream(http, url, tokens_of(rng, prompt), 2)).ttft)
    return ttfts


async def idle_wakeup(url: str) -> None:
    """TTFT of one request after the engine idled for a while (the calibration's requests
    come back to back)."""
    rng = random.Random(3)
    async with aiohttp.ClientSession() as http:
        for _ in range(5):  # warm-up
            await stream(http, url, tokens_of(rng, 64), 2)
        for p in (64, 1024):
            for gap in (0.0, *IDLE_GAPS):
                ttfts = [t * 1e3 for t in await ttft_after_idle(http, url, rng, p, gap, 15)]
                print(f"prompt {p:5d} tokens, idle {gap:4.2f} s before each: TTFT median "
                      f"{statistics.median(ttfts):6.2f} ms, min {min(ttfts):6.2f} ms", flush=True)


def _binned_model_times(steps: np.ndarray) -> list[tuple[float, float]]:
    """(median scheduled tokens, median model ms) per TABLE_TOKENS bin with >= 3 steps."""
    scheduled = steps[:, 2] + steps[:, 4]
    elapsed = steps[:, 5]
    out = []
    for lo, hi in zip(TABLE_TOKENS, (*TABLE_TOKENS[1:], 10**9), strict=True):
        mask = (scheduled >= lo) & (scheduled < hi)
        if mask.sum() >= 3:
            out.append((float(np.median(scheduled[mask])), float(np.median(elapsed[mask]))))
    return out


def fit_preset(cal: dict[str, object]) -> dict[str, object]:
    """The step table and the serving path's per-request cost.

    The table holds step *periods* by scheduled tokens, as the client sees them: up to the
    largest calibrated decode batch, the median token gap of B concurrent decode streams (a
    decode step schedules B tokens); above, prefill-sized steps: vLLM's median model time for
    that many tokens plus the loop overhead a single decode showed (its period minus its model
    time), timed while `LOADED_DECODES` other streams decode (a replay's prefills rarely run
    alone). `c_kv` (ms per decode per token of its context) is the long-prompt streams' extra
    period over the short-prompt ones; the decode periods in the table have their own
    contexts' share taken out, since the step model adds `c_kv` x the decodes' contexts. The
    per-request cost is an idle engine's TTFT minus its prefill step's period; the wake-up
    table, how much later a 64-token prefill answers after an idle spell than back to back.
    """
    steps = np.array(cal["steps"])  # type: ignore[arg-type]
    model = _binned_model_times(steps)
    # prefill-sized steps as timed while others decode: a line through every such step of at
    # least 256 tokens (power-of-two bins' medians mixed the prompt sizes and chunk remainders)
    loaded = np.array(cal.get("steps_loaded", [])).reshape(-1, 6)
    tokens = loaded[:, 2] + loaded[:, 4]
    big = tokens >= 256
    if big.sum() >= 6:
        slope, intercept = np.polyfit(tokens[big], loaded[big, 5], 1)
        model = [(x, y) for x, y in model if x < 256] + [
            (float(x), float(intercept + slope * x)) for x in (256, 512, 1024, 1536, 2048)]

    def model_ms(tokens: float) -> float:
        xs, ys = zip(*model, strict=True)
        return float(np.interp(tokens, xs, ys))

    decode = {int(b): gaps for b, gaps in cal["decode"].items() if gaps}  # type: ignore[union-attr]
    periods = {b: statistics.median(gaps) * 1e3 for b, gaps in sorted(decode.items())}
    long = {int(b): gaps for b, gaps in cal.get("decode_long", {}).items()  # type: ignore[union-attr]
            if gaps and int(b) in periods}
    slopes = [(statistics.median(gaps) * 1e3 - periods[b]) / (b * (LONG_CTX - SHORT_CTX))
              for b, gaps in long.items()]
    c_kv = max(statistics.median(slopes), 0.0) if slopes else 0.0
    periods = {b: p - c_kv * b * SHORT_CTX for b, p in periods.items()}
    overhead = max(periods[min(periods)] - model_ms(float(min(periods))), 0.0)
    largest = max(periods)
    table = [(float(b), p) for b, p in periods.items()]
    table += [(x, y + overhead) for x, y in model if x > largest]
    table_x = tuple(x for x, _ in table)
    # a step of more tokens is never faster: the running maximum irons out measurement noise
    table_y = tuple(float(y) for y in np.maximum.accumulate([y for _, y in table]))
    prefill = cal["prefill"]  # type: ignore[assignment]
    frontend = statistics.median(
        statistics.median(t) * 1e3 - float(np.interp(float(p), table_x, table_y))
        for p, t in prefill.items())  # type: ignore[union-attr]
    base = statistics.median({int(p): t for p, t in prefill.items()}[64]) * 1e3  # type: ignore[union-attr]
    wake = [(0.0, 0.0)] + [
        (float(gap), round(max(statistics.median(t) * 1e3 - base, 0.0), 3))
        for gap, t in sorted(cal.get("wake", {}).items(), key=lambda kv: float(kv[0]))]  # type: ignore[union-attr]
    return {"tokens": [round(x) for x in table_x], "ms": [round(y, 4) for y in table_y],
            "idle_wakeup_ms": wake if len(wake) > 1 else [],
            "c_seq": 0.0, "c_kv": round(c_kv, 8), "step_overhead_ms": round(overhead, 4),
            "frontend_ms": round(max(frontend, 0.0), 4),
            "source": "bench/vllm_fidelity.py --write-preset: vLLM 0.32 CPU, one core, behind "
                      f"a lite gateway, {len(steps)} steps, {time.strftime('%Y-%m-%d')}"}


# ---- 2. the workload, live ------------------------------------------------------------------


def workload(n: int, rate_scale: float) -> list[Request]:
    """The first `n` requests of the bundled Azure conversation trace, arrivals `rate_scale`x
    faster, prompts clipped to MAX_PROMPT and outputs to MAX_OUTPUT tokens (the tiny engines'
    2048-token context)."""
    trace = load_trace("azure-conv").requests[:n]
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


def _hist(url: str, name: str) -> dict[float, float]:
    """A Prometheus histogram's cumulative bucket counts, summed over series."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for m in re.finditer(rf'^{re.escape(name)}_bucket{{[^}}]*le="([^"]+)"[^}}]*}} (\S+)$', text,
                         re.MULTILINE):
        le = float(m.group(1))
        out[le] = out.get(le, 0.0) + float(m.group(2))
    return out


def _quantiles_of(buckets: dict[float, float]) -> str:
    """p50 / p90 / p99 upper bucket bounds of a cumulative histogram, in ms."""
    items = sorted(buckets.items())
    total = items[-1][1] if items else 0
    if not total:
        return "no samples"
    def q(p: float) -> str:
        le = next(le for le, c in items if c >= p * total)
        return f"<={le * 1e3:g}"
    return f"p50 {q(0.5)}, p90 {q(0.9)}, p99 {q(0.99)} ms ({int(total)} requests)"


def gateway(engines: list[VllmEngine], port: int, work: Path, venv: Path
            ) -> AbstractContextManager[object]:
    """A lite-mode gateway (embedded load-balance) in front of `engines`, on `port`."""
    return child(["gateway", "--host", "127.0.0.1", "--port", str(port),
                  "--enable-full-mode-scheduling=false", "--llm-backend-endpoints",
                  ",".join(e.address for e in engines), "--served-model-name", MODEL,
                  "--tokenizer-path", str(venv / MODEL)], port=port,
                 log=work / f"gateway-{port}.log")


def live_run(venv: Path, work: Path, requests: list[Request], n_engines: int,
             direct: bool = False) -> tuple[dict[str, Stream], np.ndarray]:
    """Client timings per request, and every step the engines ran (their iteration logs).
    `direct`: the client talks to the (single) engine, no gateway in between."""
    engines = [VllmEngine(venv, free_port(), core, work,
                          extra_env={"PRESCIENT_QUIET_ITERATION_LOGS": "0"})
               for core in range(n_engines)]
    port = free_port()
    try:
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready()
        with (ahead_of_the_engines(engines),
              contextlib.nullcontext() if direct else gateway(engines, port, work, venv)):
            url = engines[0].url if direct else f"http://127.0.0.1:{port}"
            asyncio.run(replay(url, requests[:8]))  # warm-up: connections, first steps
            offsets = [e.log_size() for e in engines]
            before = [_hist(e.url, "vllm:time_to_first_token_seconds") for e in engines]
            gw_before = {} if direct else _hist(url, "prescient_gateway_ttft_seconds")
            streams = asyncio.run(replay(url, requests))
            after = [_hist(e.url, "vllm:time_to_first_token_seconds") for e in engines]
            gw_after = {} if direct else _hist(url, "prescient_gateway_ttft_seconds")
            engine_ttft = {le: sum(a[le] - b.get(le, 0) for a, b in zip(after, before,
                                                                        strict=True))
                           for le in after[0]}
            print("TTFT at the engines (vLLM's histogram):", _quantiles_of(engine_ttft))
            gw_ttft = {le: gw_after[le] - gw_before.get(le, 0) for le in gw_after}
            print("TTFT at the gateway (its histogram):   ",
                  _quantiles_of(gw_ttft) if gw_ttft else "no gateway")
            steps = np.concatenate([steps_since(e, o) for e, o in zip(engines, offsets,
                                                                      strict=True)])
            return streams, steps
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


def step_report(steps: np.ndarray) -> None:
    """The replay's own steps against the preset's table: how much slower a step of the same
    size ran with both engines, the gateway and the client on the machine."""
    preset = get_preset(PRESET)
    model = preset.model
    scheduled = steps[:, 2] + steps[:, 4]
    print(f"replay steps: {len(steps)}; model time by scheduled tokens, replay vs preset (ms)")
    for lo, hi in zip(TABLE_TOKENS, (*TABLE_TOKENS[1:], 10**9), strict=True):
        mask = (scheduled >= lo) & (scheduled < hi)
        if mask.sum() >= 3:
            mid = float(np.median(scheduled[mask]))
            table_ms = model.step_time(int(mid), 0.0, 0, 0) * 1e3
            print(f"  {lo:>5}-{hi if hi < 10**9 else '':<5} n={int(mask.sum()):>6}  replay "
                  f"{float(np.median(steps[mask, 5])):7.2f}  preset {table_ms:7.2f}")


def quantiles(values: list[float]) -> tuple[float, float, float]:
    arr = np.array(values)
    return (float(np.percentile(arr, 50)), float(np.percentile(arr, 90)),
            float(np.percentile(arr, 99)))


def compare(live: dict[str, Stream], sim: dict[str, tuple[float | None, float | None]],
            plot: str | None, n_engines: int) -> None:
    metrics = {
        "TTFT": ([s.ttft for s in live.values()],
                 [t for t, _ in sim.values() if t is not None]),
        "TPOT": ([s.tpot for s in live.values() if s.tpot is not None],
                 [p for _, p in sim.values() if p is not None]),
    }
    # a stream whose tokens all came in one read: vLLM's API server held it back until it ended
    withheld = sum(1 for s in live.values() if s.tokens > 2 and max(s.gaps) < 1e-4)
    print(f"streams delivered whole at their end: {withheld} of {len(live)}")
    print("metric  source        p50 ms   p90 ms   p99 ms")
    for name, (real, simulated) in metrics.items():
        rq, sq = quantiles(real), quantiles(simulated)
        print(f"{name}    vLLM       {rq[0] * 1e3:8.2f} {rq[1] * 1e3:8.2f} {rq[2] * 1e3:8.2f}")
        print(f"{name}    simulated  {sq[0] * 1e3:8.2f} {sq[1] * 1e3:8.2f} {sq[2] * 1e3:8.2f}")
        med, tail = sq[0] / rq[0] - 1, sq[2] / rq[2] - 1
        print(f"{name}    sim/real   {med:+8.1%} {sq[1] / rq[1] - 1:+8.1%} {tail:+8.1%}   "
              f"median {'MET' if abs(med) <= 0.05 else 'NOT MET'} (5%), p99 "
              f"{'MET' if abs(tail) <= 0.15 else 'NOT MET'} (15%)")
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (name, (real, simulated)) in zip(axes, metrics.items(), strict=True):
            for label, values in ((f"vLLM CPU ({n_engines} engine(s))", real),
                                  (f"simulated ({n_engines} x {PRESET})", simulated)):
                xs = np.sort(np.array(values) * 1e3)
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
            ax.set_xscale("log")
            ax.set_xlabel(f"{name} (ms)")
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


def write_preset(venv: Path, work: Path) -> None:
    """Calibrate one engine behind a gateway and store the fitted preset."""
    engine = VllmEngine(venv, free_port(), 0, work,
                        extra_env={"PRESCIENT_QUIET_ITERATION_LOGS": "0"})
    engine.start()
    port = free_port()
    try:
        engine.wait_ready()
        with ahead_of_the_engines([engine]), gateway([engine], port, work, venv):
            cal = asyncio.run(calibrate(engine, f"http://127.0.0.1:{port}"))
    finally:
        engine.stop()
    Path(tempfile.gettempdir(), "vllm_fidelity_calibration.json").write_text(json.dumps(cal))
    fitted = fit_preset(cal)
    PRESET_FILE.write_text(json.dumps(fitted, indent=1) + "\n")
    print(f"wrote {PRESET_FILE}: step periods {fitted['ms']} ms at "
          f"{fitted['tokens']} tokens (loop overhead {fitted['step_overhead_ms']:.2f} "
          f"ms), {fitted['c_kv'] * 1e3:.3f} us per decode per context token, serving "
          f"path {fitted['frontend_ms']:.2f} ms per request, idle wake-up (s, ms) "
          f"{fitted['idle_wakeup_ms']}")


def measure_idle_wakeup(venv: Path, work: Path) -> None:
    engine = VllmEngine(venv, free_port(), 0, work)
    engine.start()
    try:
        engine.wait_ready()
        with ahead_of_the_engines([engine]):
            asyncio.run(idle_wakeup(engine.url))
    finally:
        engine.stop()


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


def resimulate(dump: str, n_engines: int, plot: str | None) -> None:
    """The requests of a `--dump` file simulated again (the preset as it is now), compared
    with that run's real timings: the model changed, the engines did not."""
    rows = json.loads(Path(dump).read_text())
    requests = [Request(request_id=r["id"], prompt_len=r["prompt"], output_len=r["output"],
                        arrival_time=r["arrival"]) for r in rows]
    live = {r["id"]: Stream(r["ttft"], [r["tpot"]] if r["tpot"] is not None else [],
                            r["output"]) for r in rows}
    compare(live, sim_run(requests, n_engines), plot, n_engines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-preset", action="store_true",
                        help=f"calibrate first and store the result as preset {PRESET}")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate-scale", type=float, default=2.0)
    parser.add_argument("--engines", type=int, choices=(1, 2), default=2,
                        help="real engines (one per core) and simulated instances")
    parser.add_argument("--plot", default="", help="write the CDF plot here (PNG)")
    parser.add_argument("--dump", default="",
                        help="write each request's lengths and real/simulated timings here (JSON)")
    parser.add_argument("--resimulate", default="", metavar="DUMP",
                        help="no engines: simulate the requests of a --dump file again (with "
                             "the preset as it is now) and compare with its real timings")
    parser.add_argument("--idle-wakeup", action="store_true",
                        help="only measure one engine's TTFT after idle pauses of 0-1 s, direct")
    parser.add_argument("--starvation", action="store_true",
                        help="only measure how long processes beside one busy engine wait for "
                             "the CPU (normal vs real-time class) during the replay")
    parser.add_argument("--direct", action="store_true",
                        help="replay straight to the engine, without a gateway (--engines 1)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.resimulate:
        resimulate(args.resimulate, args.engines, args.plot or None)
        return
    venv = vllm_venv()
    with tempfile.TemporaryDirectory(prefix="pvf-") as d:
        work = Path(d)
        if args.idle_wakeup:
            measure_idle_wakeup(venv, work)
            return
        if args.starvation:
            measure_starvation(venv, work, workload(args.requests, args.rate_scale))
            return
        if args.write_preset:
            write_preset(venv, work)
        requests = workload(args.requests, args.rate_scale)
        live, steps = live_run(venv, work, requests, args.engines, args.direct)
    print(f"{len(requests)} requests of azure-conv, rate x{args.rate_scale:g}, prompts <= "
          f"{MAX_PROMPT}, outputs <= {MAX_OUTPUT}; lite load-balance over {args.engines} "
          "engine(s)")
    sim = sim_run(requests, args.engines)
    compare(live, sim, args.plot or None, args.engines)
    if args.dump:
        rows = [{"id": r.request_id, "arrival": r.arrival_time, "prompt": r.prompt_len,
                 "output": r.output_len, "ttft": live[r.request_id].ttft,
                 "tpot": live[r.request_id].tpot, "head": live[r.request_id].head,
                 "first_byte": live[r.request_id].first_byte, "sim_ttft": sim[r.request_id][0],
                 "sim_tpot": sim[r.request_id][1]} for r in requests]
        Path(args.dump).write_text(json.dumps(rows))
    step_report(steps)


if __name__ == "__main__":
    main()
