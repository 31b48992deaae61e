"""Where a llumlet gets an engine's status when the engine does not push one.

Upstream's llumlet falls back to the engine's `get_instance_status` utility call when no push
arrived within `LLUMNIX_ENGINE_GET_STATUS_TIMEOUT`. A `StatusSource` is that pull:

- `SnapshotSource` wraps an in-process engine's `snapshot()` (the sim engine);
- `MetricsScrapeSource` builds a "lite-fashion" status from a stock vLLM or SGLang server's
  Prometheus `/metrics`, so an unpatched engine can sit in the CMS with the load signals the
  peer routers read (running and waiting requests, KV usage). With no engine pushing, the
  llumlet pulls once per `engine_timeout_s`, so that setting is the scrape period (upstream's
  "pull" status mode): any engine becomes a CMS citizen, at the cost of scrape staleness.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from prescient.model import InstanceStatus

logger = logging.getLogger(__name__)

# Gauge names per signal, the first one found wins (vLLM v1, its pre-0.10 name, SGLang).
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
KV_USAGE_RATIO = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
USED_TOKENS = ("sglang:num_used_tokens",)
TOTAL_TOKENS = ("sglang:max_total_num_tokens",)
VLLM_CACHE_CONFIG = "vllm:cache_config_info"  # labels block_size, num_gpu_blocks; value 1


class StatusSource(Protocol):
    """Pulls one status from an engine; raises on any failure."""

    async def get_status(self) -> InstanceStatus: ...


class SnapshotSource:
    """A `StatusSource` over an in-process engine's synchronous `snapshot()`."""

    def __init__(self, snapshot: Callable[[], InstanceStatus]) -> None:
        self._snapshot = snapshot

    async def get_status(self) -> InstanceStatus:
        return self._snapshot()


class MetricsScrapeSource:
    """A status scraped from a vLLM or SGLang `/metrics` endpoint.

    Fills `num_running_requests`, `num_waiting_requests`, and the KV token counts. Counts are
    summed over series (a data-parallel server labels each engine); the usage ratio is
    averaged. The used tokens are `ratio * total`, or SGLang's exact `num_used_tokens`. The
    total comes from `num_total_gpu_tokens` if given, else from the server
    (`vllm:cache_config_info` num_gpu_blocks * block_size, `sglang:max_total_num_tokens`);
    with neither, both token counts stay 0 (a warning says so once). `update_id` increases on
    every successful scrape, so each scrape is a fresh status to the reader (`update_ids`
    shares that counter with pushed statuses, when the engine also pushes).

    Args:
        url: the metrics URL, e.g. http://10.0.0.1:8000/metrics.
        instance_id: the CMS id the status carries.
        num_total_gpu_tokens: KV capacity in tokens, overriding what the server reports.
        timeout_s: whole-request timeout of one scrape.
        update_ids: the `update_id` of each scrape, in turn; default 1, 2, 3...
    """

    def __init__(self, url: str, instance_id: str, *, num_total_gpu_tokens: int | None = None,
                 timeout_s: float = 5.0, update_ids: Iterator[int] | None = None) -> None:
        self.url = url
        self.instance_id = instance_id
        self.num_total_gpu_tokens = num_total_gpu_tokens
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._update_ids = update_ids if update_ids is not None else itertools.count(1)
        self._warned_no_total = False

    async def get_status(self) -> InstanceStatus:
        """Scrape once.

        Raises:
            aiohttp.ClientError, TimeoutError: the endpoint did not answer 200.
            ValueError: the body is not Prometheus text, or lacks the running/waiting gauges.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.get(self.url) as response:
            response.raise_for_status()
            text = await response.text()
        status = self.parse(text)
        status.update_id = next(self._update_ids)
        return status

    def parse(self, text: str) -> InstanceStatus:
        """The status a metrics page describes (`update_id` left 0)."""
        gauges = _gauges(text)
        running, waiting = _first(gauges, RUNNING), _first(gauges, WAITING)
        if running is None or waiting is None:
            raise ValueError(f"{self.url}: no vLLM or SGLang running/waiting request gauges")
        total = self.num_total_gpu_tokens or _total_tokens(gauges)
        used = _used_tokens(gauges, total)
        if total == 0 and not self._warned_no_total:
            self._warned_no_total = True
            logger.warning("%s: KV capacity unknown (pass num_total_gpu_tokens); KV token counts "
                           "stay 0", self.url)
        return InstanceStatus(
            instance_id=self.instance_id, num_running_requests=round(running),
            num_waiting_requests=round(waiting), num_total_gpu_tokens=total,
            num_used_gpu_tokens=min(used, total))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _gauges(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name, each as (labels, value)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _first(gauges: dict[str, list[tuple[dict[str, str], float]]],
           names: Iterable[str], *, mean: bool = False) -> float | None:
    for name in names:
        values = [value for _, value in gauges.get(name, ())]
        if values:
            return sum(values) / len(values) if mean else sum(values)
    return None


def _total_tokens(gauges: dict[str, list[tuple[dict[str, str], float]]]) -> int:
    total = _first(gauges, TOTAL_TOKENS)
    if total is not None:
        return round(total)
    engines = gauges.get(VLLM_CACHE_CONFIG, ())
    blocks = [_int_label(labels, "num_gpu_blocks") * _int_label(labels, "block_size")
              for labels, _ in engines]
    return sum(blocks)


def _used_tokens(gauges: dict[str, list[tuple[dict[str, str], float]]], total: int) -> int:
    used = _first(gauges, USED_TOKENS)
    if used is not None:
        return round(used)
    ratio = _first(gauges, KV_USAGE_RATIO, mean=True)
    return 0 if ratio is None else round(max(0.0, min(ratio, 1.0)) * total)


def _int_label(labels: dict[str, str], name: str) -> int:
    value = labels.get(name, "")
    return int(value) if value.isdigit() else 0
