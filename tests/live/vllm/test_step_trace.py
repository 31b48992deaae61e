"""The plugin's step trace (`PRESCIENT_STEP_TRACE`) in a real vLLM engine: each step timed by
the engine core's own clock (the host's monotonic clock, the client's too), and each finished
request's engine-side latencies under the id the client sent."""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from .engine import MODEL, VllmEngine

pytestmark = pytest.mark.timeout(300)

STREAMS, PROMPT_TOKENS, OUTPUT_TOKENS = 3, 400, 24


def test_the_trace_times_each_step_and_request_on_the_clients_clock(
        vllm_pair: list[VllmEngine]) -> None:
    engine = vllm_pair[0]
    offset = engine.step_trace.stat().st_size
    client = OpenAI(base_url=engine.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def one(i: int) -> tuple[float, float, float]:
        """(sent, first token, last token) on time.monotonic()."""
        prompt = [100 + i * 7 + (k * 13) % 900 for k in range(PROMPT_TOKENS)]  # no shared prefix
        sent = time.monotonic()
        arrivals = [time.monotonic() for chunk in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=OUTPUT_TOKENS, stream=True,
            extra_body={"ignore_eos": True}, extra_headers={"x-request-id": f"trace-{i}"})
            if chunk.choices and chunk.choices[0].text]
        return sent, arrivals[0], arrivals[-1]

    with ThreadPoolExecutor(STREAMS) as pool:
        timings = list(pool.map(one, range(STREAMS)))
    time.sleep(0.5)  # the API server traces a step just after its tokens leave
    with open(engine.step_trace, "rb") as f:
        f.seek(offset)
        lines = [json.loads(line) for line in f.read().splitlines()]
    steps = [line for line in lines if "model_ms" in line]
    finished = {line["request"]: line for line in lines if "request" in line}

    # every prompt token was prefilled and every output decoded in the traced steps
    assert sum(s["prefill_tokens"] for s in steps) == STREAMS * PROMPT_TOKENS
    assert sum(s["decodes"] for s in steps) == STREAMS * (OUTPUT_TOKENS - 1)
    stamps = [s["t"] for s in steps if s["t"] is not None]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    # the engine's clock is the client's: every step lies between the first send and the
    # last token's arrival
    assert min(t for t, _, _ in timings) < stamps[0] and stamps[-1] < max(e for *_, e in timings)
    # a step that followed another straight away lasted at least its model time
    for prev, cur in itertools.pairwise(steps):
        if prev["t"] and cur["t"] and prev["running"] + prev["waiting"]:
            assert (cur["t"] - prev["t"]) * 1e3 >= cur["model_ms"] > 0
    # each request, under vLLM's id for the client's x-request-id: lengths exact, and the
    # engine's TTFT and decode time within what the client saw
    assert set(finished) == {f"cmpl-trace-{i}-0" for i in range(STREAMS)}
    for i, (sent, first, last) in enumerate(timings):
        done = finished[f"cmpl-trace-{i}-0"]
        assert (done["prompt"], done["generated"]) == (PROMPT_TOKENS, OUTPUT_TOKENS)
        assert 0 < done["queued_s"] + done["prefill_s"] < first - sent
        assert 0 < done["decode_s"] < last - sent
