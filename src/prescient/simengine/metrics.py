"""vLLM's Prometheus metrics, for the simulated engine's `/metrics`.

Names, labels (`model_name`, `engine`) and histogram buckets are vLLM v1's
(`vllm/v1/metrics/loggers.py`, peers.md §4.1), so anything that reads a vLLM server's
`/metrics` (peer routers, llm-d scorers, our llumlet's `MetricsScrapeSource`, dashboards) reads
this one. Gauges are computed from the engine's status at scrape time; counters and
histograms are fed by the server as requests progress. Latencies are engine (simulated)
seconds, equal to wall seconds at `--time-scale 1`. Each server owns its registry, so two
servers in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prescient.model import InstanceStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineGauges(Collector):
    """Running, waiting and KV usage from a fresh status, plus the cache config info gauge."""

    def __init__(self, labels: dict[str, str], snapshot: Callable[[], InstanceStatus],
                 cache_config: dict[str, str]) -> None:
        self._labels = labels
        self._snapshot = snapshot
        self._cache_config = cache_config

    def collect(self) -> Iterator[Metric]:
        status = self._snapshot()
        names, values = list(self._labels), list(self._labels.values())
        usage = status.num_used_gpu_tokens / max(1, status.num_total_gpu_tokens)
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             status.num_running_requests),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             status.num_waiting_requests),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=names)
            gauge.add_metric(values, value)
            yield gauge
        info = {**self._labels, **self._cache_config}
        gauge = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine "
                                  "CacheConfig", labels=list(info))
        gauge.add_metric(list(info.values()), 1.0)
        yield gauge


class EngineMetrics:
    """The server's metrics registry and the hooks that feed it."""

    def __init__(self, model_name: str, snapshot: Callable[[], InstanceStatus], *,
                 block_size: int, num_gpu_blocks: int, enable_prefix_caching: bool) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        self._labels = labels
        names = list(labels)
        reg = self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     names, registry=reg).labels(**labels)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation "
                                         "tokens processed.", names, registry=reg
                                         ).labels(**labels)
        self._success = Counter("vllm:request_success", "Count of successfully processed "
                                "requests.", [*names, "finished_reason"], registry=reg)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to "
                              "first token in seconds.", names, buckets=_TTFT_BUCKETS,
                              registry=reg).labels(**labels)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token "
                             "latency in seconds.", names, buckets=_ITL_BUCKETS,
                             registry=reg).labels(**labels)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds", "Histogram of "
                              "time_per_output_token_seconds per request.", names,
                              buckets=_ITL_BUCKETS, registry=reg).labels(**labels)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request "
                             "latency in seconds.", names, buckets=_E2E_BUCKETS,
                             registry=reg).labels(**labels)
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried "
            "tokens.", names, registry=reg).labels(**labels)
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached "
            "tokens.", names, registry=reg).labels(**labels)
        # P/D disaggregation: prompt tokens whose KV arrived from a prefill instance (not
        # computed here), and the requests that brought it
        self.kv_received_tokens = Counter(
            "prescient:kv_transfer_received_tokens", "Prompt tokens whose KV arrived from a "
            "prefill instance instead of being computed here.", names, registry=reg
        ).labels(**labels)
        self.kv_received_requests = Counter(
            "prescient:kv_transfer_received_requests", "Requests whose prompt KV arrived from "
            "a prefill instance.", names, registry=reg).labels(**labels)
        # live migration (simengine/migration.py): requests committed on their destination
        self._migrations = Counter(
            "prescient:migrated_requests", "Requests migrated, by direction: out (committed "
            "on another instance) or in (arrived here).", [*names, "direction"], registry=reg)
        cache_config = {"block_size": str(block_size), "num_gpu_blocks": str(num_gpu_blocks),
                        "enable_prefix_caching": str(enable_prefix_caching)}
        reg.register(_EngineGauges(labels, snapshot, cache_config))

    def first_token(self, prompt_tokens: int, ttft_s: float, cached_tokens: int = 0) -> None:
        """A request's prefill finished: its prompt counts as processed, `cached_tokens` of it
        served from the prefix cache."""
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_cache_queries.inc(prompt_tokens)
        self.prefix_cache_hits.inc(cached_tokens)
        self.ttft.observe(ttft_s)

    def kv_received(self, tokens: int) -> None:
        """A request's prompt KV (`tokens` of it) arrives from a prefill instance."""
        self.kv_received_requests.inc()
        self.kv_received_tokens.inc(tokens)

    def migrated(self, direction: str) -> None:
        """A request left ("out") or arrived ("in") by migration."""
        self._migrations.labels(**self._labels, direction=direction).inc()

    def tokens(self, n: int, gap_s: float | None) -> None:
        """`n` tokens arrived, `gap_s` after the previous ones (None: the first batch)."""
        self.generation_tokens.inc(n)
        if gap_s is not None and n > 0:
            for _ in range(n):
                self.itl.observe(gap_s / n)

    def finished(self, reason: str, e2e_s: float, tpot_s: float | None) -> None:
        self._success.labels(**self._labels, finished_reason=reason).inc()
        self.e2e.observe(e2e_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
