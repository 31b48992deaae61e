"""The rescheduler live: a scheduler service reads the CMS on Redis and migrates running requests
between two `prescient sim-engine` processes over their llumlets' gRPC service.

Six long streams go straight to engine A (as a gateway that ignored load might send them); the
rescheduler sees A's decode batch 6 and B's 0 and moves requests until the gap is under 2. Every
client stream arrives whole. No timing assertions: every wait is for a condition.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI

from .harness import RedisTarget, free_port, shared_redis
from .stack import (
    MODEL,
    Service,
    Stack,
    cms_flags,
    engine_args,
    health,
    http_post,
    metric,
    scheduler_args,
    wait_until,
)

NUM_STREAMS = 6
MAX_TOKENS = 1200
PROMPT = "the quick brown fox jumps over the lazy dog " * 6


def engine_with_llumlet(redis: RedisTarget, name: str) -> Callable[[int], list[str]]:
    grpc_port = free_port()
    base = engine_args(redis, time_scale=4.0)
    return lambda port: [*base(port), "--instance-id", name, "--llumlet-port", str(grpc_port)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, list[Service]]]:
    stack = Stack(tmp_path_factory.mktemp("rescheduling-logs"))
    try:
        with shared_redis() as redis, stack.diagnosis():
            engines = stack.start([("engine-a", engine_with_llumlet(redis, "engine-a")),
                                   ("engine-b", engine_with_llumlet(redis, "engine-b"))])
            [scheduler] = stack.start([("scheduler", scheduler_args(
                *cms_flags(redis), "--enable-rescheduling",
                "--rescheduling-policies", "neutral_load",
                "--rescheduling-neutral-load-metric", "decode_batch_size",
                "--rescheduling-neutral-load-threshold", "0",
                "--rescheduling-load-balance-threshold", "2",
                "--rescheduling-req-select-rule", "NUM_REQ",
                "--rescheduling-req-select-order", "LCR",
                "--rescheduling-req-select-value", "1",
                "--rescheduling-interval-ms", "100"))])
            wait_until(lambda: health(scheduler).get("instances") == 2, 15,
                       "the scheduler to see both engines in the CMS", stack)
            yield stack, [*engines, scheduler]
    finally:
        stack.close()


def stream(engine: Service, request_id: str) -> tuple[str, str | None, int]:
    client = OpenAI(base_url=engine.url + "/v1", api_key="x", max_retries=0, timeout=60)
    text, reason, usage = "", None, 0
    for chunk in client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-request-id": request_id}):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.text
            reason = choice.finish_reason or reason
    return text, reason, usage


def test_the_rescheduler_balances_running_streams_and_none_breaks(
        stack: tuple[Stack, list[Service]], tmp_path: Path) -> None:
    s, (a, b, scheduler) = stack
    with s.diagnosis(), ThreadPoolExecutor(NUM_STREAMS) as pool:
        ids = [f"balance-{i}" for i in range(NUM_STREAMS)]
        results = list(pool.map(lambda rid: stream(a, rid), ids))
    moved_out = metric(a, "prescient:migrated_requests_total", direction="out")
    moved_in = metric(b, "prescient:migrated_requests_total", direction="in")
    calls = metric(scheduler, "prescient_scheduler_rescheduling_total", outcome="migrating",
                   policy="neutral_load")
    assert 1 <= moved_out == moved_in <= NUM_STREAMS - 1, (moved_out, moved_in)
    assert calls >= moved_in
    for rid, (text, reason, usage) in zip(ids, results, strict=True):
        assert (reason, usage) == ("length", MAX_TOKENS), rid
        status, answer = http_post(a.url + "/tokenize",
                                   json.dumps({"model": MODEL, "prompt": text,
                                               "add_special_tokens": False}).encode())
        assert status == 200 and answer["count"] == MAX_TOKENS, rid  # every token arrived
