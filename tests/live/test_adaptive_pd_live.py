"""Adaptive PD live: the `slo` policy with `--enable-adaptive-pd` in full mode, in front of three
neutral sim-engines whose llumlets write an in-process CMS and serve gRPC migration.

The gateway forwards every request as a prefill leg and a decode leg (`vllm-kvt`, staged); the
scheduler picks both legs by predicted TTFT / TPOT from profiles of the engines' own preset;
the live rescheduler runs the bin-packing policies beside it (here nothing needs moving: eight
decodes fit one instance). Every client stream arrives whole.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI

from prescient.cms.store import MemoryStore
from prescient.config.gateway import load_gateway_settings
from prescient.config.scheduler import load_scheduler_settings
from prescient.config.sim_engine import SimEngineSettings
from prescient.gateway.app import Gateway
from prescient.profiling import profile_engine, write_profiles
from prescient.scheduler.core import SchedulerCore
from prescient.scheduler.rescheduling import LiveRescheduler
from prescient.simengine.server import SERVER_KEY, SimEngineServer, build_app, start_server
from prescient.tokenizer import ApproxTokenizer

from .harness import free_port
from .test_pd import MODEL, TypedResolver, count, discovered, scraped

PRESET = "llama3-8b-h100"
NUM_REQUESTS = 8
MAX_TOKENS = 300


@contextlib.asynccontextmanager
async def engine(name: str, store: MemoryStore) -> AsyncIterator[SimEngineServer]:
    port = grpc_port = free_port()
    while grpc_port == port:
        grpc_port = free_port()
    settings = SimEngineSettings(host="127.0.0.1", port=port, time_scale=5.0, instance_id=name,
                                 preset=PRESET, enable_llumlet=True, llumlet_port=grpc_port,
                                 llumlet_status_push_interval_s=0.01)
    app = build_app(settings, store=store)
    runner = await start_server(settings, app=app)
    try:
        yield app[SERVER_KEY]
    finally:
        await runner.cleanup()


def test_adaptive_pd_bin_packs_decodes_and_prefills_elsewhere_live(tmp_path: Path) -> None:
    ttft, tpot = profile_engine(PRESET, tokens_grid=(64, 512, 2048), batch_grid=(1, 8, 32),
                                tpr_grid=(128, 1024), max_num_batched_tokens=2048, repeats=1)
    ttft_path, tpot_path = write_profiles(tmp_path, ttft, tpot)
    flags = ["--scheduling-policy", "slo", "--enable-adaptive-pd",
             "--ttft-profiling-data-path", str(ttft_path),
             "--tpot-profiling-data-path", str(tpot_path), "--tpot-slo", "50",
             "--ttft-slo", "6000", "--cms-pull-status-interval-ms", "20",
             "--enable-rescheduling", "--rescheduling-interval-ms", "50",
             "--rescheduling-policies", "binpacking_mitigation,binpacking_consolidation"]

    async def main() -> dict[str, Any]:
        store = MemoryStore()
        async with (engine("e0", store) as e0, engine("e1", store) as e1,
                    engine("e2", store) as e2):
            engines = [e0, e1, e2]
            resolver = TypedResolver([discovered(e) for e in engines])
            scheduler = SchedulerCore(load_scheduler_settings(flags, {}), store=store)
            settings = load_gateway_settings(
                ["--llm-backend-discovery", "redis", "--pd-disagg-protocol", "vllm-kvt",
                 "--separate-pd-scheduling", "true"], {})
            gateway = Gateway(settings, scheduler=scheduler, resolver=resolver,
                              tokenizer=ApproxTokenizer(), gateway_id="apd")
            await gateway.start()
            rescheduler = LiveRescheduler(scheduler, scheduler.settings)
            outcomes: list[str] = []
            rescheduler.on_outcome = lambda plan, outcome: outcomes.append(outcome)
            task = asyncio.create_task(rescheduler.run())
            server = await gateway.serve("127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                 max_retries=0, timeout=60)

            async def one(i: int) -> tuple[int, str]:
                stream = await client.completions.create(
                    model=MODEL, prompt=f"request {i} " + "tell me a story " * (40 + 30 * i),
                    max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
                usage, reason = 0, ""
                async for chunk in stream:
                    usage = chunk.usage.completion_tokens if chunk.usage else usage
                    for c in chunk.choices:
                        reason = c.finish_reason or reason
                return usage, reason

            try:
                answers = await asyncio.gather(*(one(i) for i in range(NUM_REQUESTS)))
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await rescheduler.close()
                await client.close()
                server.close()
                await gateway.close()
            m = [scraped(e) for e in engines]
            return {"answers": answers, "outcomes": outcomes, "fallbacks":
                    gateway.metrics.fallbacks,
                    "kv_in": [count(x, "prescient:kv_transfer_received_requests_total")
                              for x in m],
                    "prefills": [count(x, "vllm:request_success_total") for x in m],
                    "migrated_in": [count(x, "prescient:migrated_requests_total") for x in m]}

    got = asyncio.run(main())
    assert got["answers"] == [(MAX_TOKENS, "length")] * NUM_REQUESTS, got
    assert got["fallbacks"] == 0  # the slo scheduler placed every leg
    assert sum(got["kv_in"]) == NUM_REQUESTS  # every decode leg took the prefill's KV
    # decodes bin-packed on one instance (eight are far under the TPOT limit), prefills on the
    # instances without decode work: the decoder finished only decode legs
    [decoder] = [i for i, n in enumerate(got["kv_in"]) if n]
    assert got["kv_in"][decoder] == got["prefills"][decoder] == NUM_REQUESTS, got
    others = [n for i, n in enumerate(got["prefills"]) if i != decoder]
    assert sum(others) == NUM_REQUESTS and all(others), got  # both other instances prefilled
    assert "failed" not in got["outcomes"], got
