"""Prescient on real vLLM CPU engines: step-time predictors on real steps, and added latency.

Needs the real-vLLM environment (`scripts/vllm/env.sh`, built on first use: ~2 min, 2.5 GB) and
the tiny random-weight Llama it makes; engines are pinned to one core each as in `make
test-vllm`. Two measurements:

1. **Predictors on real step timings.** One engine serves a mixed workload (Poisson arrivals,
   prompts 16-1500 tokens, outputs 8-300 tokens, token-id prompts with `ignore_eos`). Every step's
   shape and duration come from vLLM's own iteration details (`--enable-logging-iteration-
   details`, logged per step), the data Prescient's plugin turns into profiling samples (it
   pushes a step's prefill tokens and duration; the log also gives the decode count, which the
   structural model needs). Steps are cut into runs of 10 consecutive steps; 7 of
   every 10 runs train, the other 3 test (spread over the whole run, so the test set has
   prefill steps from every load level, and adjacent steps never straddle the split):
   - the quadratic predictor (upstream's: prefill steps only, `y = a x² + b x + c` over the
     step's prefill tokens),
   - the structural model (NexusSched; every step, `B` requests and `S` tokens),
   on the held-out prefill steps and on all held-out steps (mixed prefill/decode), as MAPE
   and p90 absolute error.
2. **Added latency.** The same short request (64-token prompt, 1 output token, not streamed)
   sent one at a time, round robin, straight to the engine, through a lite-mode gateway
   (embedded scheduler) and through a full-mode gateway (remote scheduler reading the CMS that
   the plugin and its llumlet fill). Added latency = gateway path - direct, p50 and p99.

    .venv/bin/python bench/vllm_real.py            # the recorded numbers
    .venv/bin/python bench/vllm_real.py --quick    # fewer requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live.harness import child, free_port, shared_redis, wait_for_port  # noqa: E402
from tests.live.vllm.engine import MODEL, VllmEngine, vllm_venv  # noqa: E402

from prescient.predict.quadratic import fit_step_time  # noqa: E402
from prescient.predict.structural import fit_structural  # noqa: E402

BLOCK = 10  # steps: each run of BLOCK consecutive steps goes to train (7) or test (3)


# ---- 1. predictors ----------------------------------------------------------------------------


async def drive(url: str, n: int, rate: float, rng: random.Random) -> None:
    """`n` requests with Poisson arrivals at `rate` per second, all awaited."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def one(prompt: int, output: int) -> None:
            body = {"model": MODEL, "prompt": [rng.randrange(10, 1400) for _ in range(prompt)],
                    "max_tokens": output, "ignore_eos": True}
            async with http.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()

        tasks = []
        for _ in range(n):
            prompt = int(min(1500, max(16, rng.lognormvariate(5.5, 0.9))))
            output = int(min(300, max(8, rng.lognormvariate(4.0, 0.8))))
            tasks.append(asyncio.create_task(one(prompt, output)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)


def errors(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(MAPE, p90 absolute error in ms)."""
    rel = np.abs(pred - true) / true
    return float(rel.mean()), float(np.percentile(np.abs(pred - true), 90))


def predictor_accuracy(engine: VllmEngine, n: int, rate: float) -> dict[str, object]:
    start = engine.log_size()
    asyncio.run(drive(engine.url, n, rate, random.Random(7)))
    time.sleep(1.0)
    steps = np.array(engine.steps_since(start), dtype=np.float64).reshape(-1, 6)
    steps = steps[steps[:, 5] > 0]
    held_out = (np.arange(len(steps)) // BLOCK) % 10 >= 7
    train, test = steps[~held_out], steps[held_out]
    prefill_train = train[train[:, 2] > 0]
    prefill_test = test[test[:, 2] > 0]

    _, a, b, c = fit_step_time(prefill_train[:, 2], prefill_train[:, 5])

    def quadratic(rows: np.ndarray) -> np.ndarray:
        x = rows[:, 2]
        return a * x * x + b * x + c

    params = fit_structural(train[:, 1] + train[:, 3], train[:, 2] + train[:, 4], train[:, 5])
    assert params is not None, "the structural fit failed"

    def structural(rows: np.ndarray) -> np.ndarray:
        return params.predict_many(rows[:, 1] + rows[:, 3], rows[:, 2] + rows[:, 4])

    return {
        "steps": len(steps), "train": len(train), "test": len(test),
        "prefill_test": len(prefill_test),
        "quadratic": {"coef": (a, b, c), "prefill": errors(quadratic(prefill_test),
                                                          prefill_test[:, 5]),
                      "mixed": errors(quadratic(test), test[:, 5])},
        "structural": {"prefill": errors(structural(prefill_test), prefill_test[:, 5]),
                       "mixed": errors(structural(test), test[:, 5])},
        "median_step_ms": float(np.median(steps[:, 5])),
    }


# ---- 2. added latency ---------------------------------------------------------------------------


def timed_post(url: str, body: bytes) -> float:
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
    return time.perf_counter() - t


def added_latency(engine: VllmEngine, paths: dict[str, str], n: int) -> dict[str, object]:
    rng = random.Random(3)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(n + 20):
        body = json.dumps({"model": MODEL, "prompt": [rng.randrange(10, 1400) for _ in range(64)],
                           "max_tokens": 1}).encode()
        for name, url in paths.items():
            took = timed_post(url, body)
            if i >= 20:  # warm-up: connections, caches
                samples[name].append(took)
    out: dict[str, object] = {}
    direct = np.array(samples["direct"])
    for name, values in samples.items():
        arr = np.array(values)
        out[name] = {"p50": float(np.median(arr)), "p99": float(np.percentile(arr, 99))}
        if name != "direct":
            out[name]["added_p50"] = float(np.median(arr) - np.median(direct))  # type: ignore[index]
            out[name]["added_p99"] = float(np.percentile(arr, 99) - np.percentile(direct, 99))  # type: ignore[index]
    return out


def gateways(stack: ExitStack, engine: VllmEngine, logs: Path) -> dict[str, str]:
    """Lite and full gateways in front of `engine`; their URLs (and the direct one)."""
    redis = stack.enter_context(shared_redis())
    cms = ["--cms-redis-host", redis.host, "--cms-redis-port", str(redis.port),
           "--cms-redis-db", str(redis.db), "--cms-pull-status-interval-ms", "50"]
    stack.enter_context(child(["llumlet", "--engine-url", engine.url, "--instance-id", "e0",
                               "--status-endpoint", engine.status_endpoint, *cms[:6]],
                              log=logs / "llumlet.log"))
    sched_port, lite_port, full_port = free_port(), free_port(), free_port()
    stack.enter_context(child(["scheduler", "--host", "127.0.0.1", "--port", str(sched_port),
                               *cms], port=sched_port, log=logs / "scheduler.log"))
    common = ["--host", "127.0.0.1", "--llm-backend-endpoints", engine.address,
              "--served-model-name", MODEL, "--tokenizer-path", str(engine.venv / MODEL)]
    stack.enter_context(child(["gateway", "--port", str(lite_port),
                               "--enable-full-mode-scheduling=false", *common],
                              port=lite_port, log=logs / "gateway-lite.log"))
    stack.enter_context(child(["gateway", "--port", str(full_port), "--scheduler-endpoints",
                               f"127.0.0.1:{sched_port}", *common],
                              port=full_port, log=logs / "gateway-full.log"))
    for port in (lite_port, full_port):
        wait_for_port(port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # full mode places only once the CMS shows the engine
        with urllib.request.urlopen(f"http://127.0.0.1:{sched_port}/health") as r:
            if json.loads(r.read()).get("instances") == 1:
                break
        time.sleep(0.2)
    return {"direct": engine.url, "lite": f"http://127.0.0.1:{lite_port}",
            "full": f"http://127.0.0.1:{full_port}"}


# ---- main ----------------------------------------------------------------------------------------


def report(acc: dict[str, object], lat: dict[str, object]) -> None:
    q, s = acc["quadratic"], acc["structural"]  # type: ignore[index]
    print(f"\n1. step-time predictors on {acc['steps']} real vLLM steps (median "
          f"{acc['median_step_ms']:.2f} ms); trained on {acc['train']}, tested on "
          f"{acc['test']} others ({acc['prefill_test']} with prefill tokens)")
    print(f"   quadratic a,b,c = {', '.join(f'{v:.3g}' for v in q['coef'])}")  # type: ignore[index]
    print("   model        held-out prefill steps      all held-out steps (mixed)")
    print("                MAPE     p90 |err| ms        MAPE     p90 |err| ms")
    for name, m in (("quadratic", q), ("structural", s)):
        pre, mix = m["prefill"], m["mixed"]  # type: ignore[index]
        print(f"   {name:<12} {pre[0] * 100:6.1f}%  {pre[1]:10.2f}        "
              f"{mix[0] * 100:6.1f}%  {mix[1]:10.2f}")
    print("\n2. added latency, 1-token completions one at a time (ms)")
    print("   path      p50      p99    added p50   added p99")
    for name, v in lat.items():
        row = v  # type: ignore[assignment]
        added = (f"{row['added_p50'] * 1e3:9.2f}   {row['added_p99'] * 1e3:9.2f}"
                 if "added_p50" in row else "")
        print(f"   {name:<7} {row['p50'] * 1e3:7.2f}  {row['p99'] * 1e3:7.2f}   {added}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    args = parser.parse_args()
    n_steps_requests, rate, n_latency = (120, 6.0, 100) if args.quick else (400, 8.0, 400)
    venv = vllm_venv()
    with tempfile.TemporaryDirectory(prefix="pvb-") as d, ExitStack() as stack:
        work = Path(d)
        engine = VllmEngine(venv, free_port(), 0, work,
                            extra_env={"PRESCIENT_QUIET_ITERATION_LOGS": "0"})
        engine.start()
        stack.callback(engine.stop)
        engine.wait_ready()
        urls = gateways(stack, engine, work)
        acc = predictor_accuracy(engine, n_steps_requests, rate)
        lat = added_latency(engine, urls, n_latency)
        version = subprocess.run([str(venv / "bin/vllm"), "--version"], capture_output=True,
                                 text=True).stdout.strip()
        print(f"vLLM {version} (CPU), {MODEL}, one engine on core 0")
        report(acc, lat)


if __name__ == "__main__":
    main()
