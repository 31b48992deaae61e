"""MetricsScrapeSource against a real HTTP server serving vLLM and SGLang `/metrics` pages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from prescient.llumlet import MetricsScrapeSource
from prescient.model import InstanceStatus

from .harness import free_port

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0
vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="1000"} 1.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"""

VLLM_OLD = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.1
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",tp_rank="0"} 7.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m",tp_rank="0"} 1.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m",tp_rank="0"} 0.3
# TYPE sglang:num_used_tokens gauge
sglang:num_used_tokens{model_name="m",tp_rank="0"} 2999.0
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{model_name="m",tp_rank="0"} 10000.0
"""


@asynccontextmanager
async def metrics_server(pages: dict[str, str]) -> AsyncIterator[str]:
    """Serve each page at /<name>; yields the base URL."""
    async def handler(request: web.Request) -> web.Response:
        page = pages.get(request.match_info["name"])
        if page is None:
            return web.Response(status=404)
        return web.Response(text=page, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def scrape(url: str, **kwargs: int) -> list[InstanceStatus]:
    source = MetricsScrapeSource(url, "inst-a", **kwargs)
    try:
        return [await source.get_status(), await source.get_status()]
    finally:
        await source.close()


def test_vllm_metrics_become_a_status() -> None:
    async def main() -> None:
        async with metrics_server({"metrics": VLLM}) as base:
            first, second = await scrape(f"{base}/metrics")
        assert first == InstanceStatus(
            instance_id="inst-a", update_id=1, num_running_requests=5, num_waiting_requests=4,
            num_total_gpu_tokens=32000, num_used_gpu_tokens=12000)  # mean usage 0.375
        assert second.update_id == 2  # every scrape is a fresh status

    asyncio.run(main())


def test_the_pre_010_vllm_names_and_a_given_capacity() -> None:
    async def main() -> None:
        async with metrics_server({"metrics": VLLM_OLD}) as base:
            status, _ = await scrape(f"{base}/metrics", num_total_gpu_tokens=5000)
        assert (status.num_running_requests, status.num_waiting_requests,
                status.num_total_gpu_tokens, status.num_used_gpu_tokens) == (1, 2, 5000, 500)

    asyncio.run(main())


def test_without_a_capacity_the_token_counts_stay_zero() -> None:
    async def main() -> None:
        async with metrics_server({"metrics": VLLM_OLD}) as base:
            status, _ = await scrape(f"{base}/metrics")
        assert (status.num_running_requests, status.num_total_gpu_tokens,
                status.num_used_gpu_tokens) == (1, 0, 0)

    asyncio.run(main())


def test_sglang_metrics_become_a_status() -> None:
    async def main() -> None:
        async with metrics_server({"metrics": SGLANG}) as base:
            status, _ = await scrape(f"{base}/metrics")
        assert (status.num_running_requests, status.num_waiting_requests,
                status.num_total_gpu_tokens, status.num_used_gpu_tokens) == (7, 1, 10000, 2999)

    asyncio.run(main())


def test_a_page_without_the_gauges_is_refused() -> None:
    async def main() -> None:
        async with metrics_server({"metrics": "# TYPE up gauge\nup 1\n"}) as base:
            with pytest.raises(ValueError, match="no vLLM or SGLang running/waiting"):
                await scrape(f"{base}/metrics")

    asyncio.run(main())


def test_an_http_error_or_an_unreachable_url_raises() -> None:
    async def main() -> None:
        async with metrics_server({}) as base:
            with pytest.raises(aiohttp.ClientResponseError):
                await scrape(f"{base}/metrics")
        with pytest.raises(aiohttp.ClientConnectionError):
            await scrape(f"http://127.0.0.1:{free_port()}/metrics")

    asyncio.run(main())
