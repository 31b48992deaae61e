"""The gateway's Prometheus metrics, cheap to update on the hot path.

prometheus_client's own metric objects take a lock and look up label children on every update
(about 1-2 µs each); a request updates five or six of them. Here an update is a dict or list
increment on plain Python numbers (the event loop is single-threaded), and a custom collector
turns them into metric families only when `/metrics` is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; scheduling is sub-millisecond when embedded, TTFT spans prefill queues
SCHEDULE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)


class Histogram:
    """Fixed buckets (`le` inclusive, as Prometheus), counted per bucket, summed at render."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class GatewayMetrics:
    """Counters and histograms the request path bumps; `render()` gives the exposition text.

    Labels: `kind` is the route (completion, chat, models); `status` the HTTP status the
    client got (499 when it left first); errors are counted by what failed.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.retries = 0
        self.replays = 0
        self.migrations = 0
        self.fallbacks = 0
        self.in_flight = 0
        self.schedule_seconds = Histogram(SCHEDULE_BUCKETS)
        self.ttft_seconds = Histogram(TTFT_BUCKETS)
        self.tpot_seconds = Histogram(TPOT_BUCKETS)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))

    def request_done(self, kind: str, status: int) -> None:
        key = (kind, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self._registry)


class _Collector(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        m = self._m
        requests = CounterMetricFamily("prescient_gateway_requests", "Requests answered, by "
                                       "route and HTTP status (499: client left).",
                                       labels=("kind", "status"))
        for (kind, status), n in sorted(m.requests.items()):
            requests.add_metric((kind, str(status)), n)
        yield requests
        errors = CounterMetricFamily("prescient_gateway_errors", "Failures, by what failed.",
                                     labels=("kind",))
        for kind, n in sorted(m.errors.items()):
            errors.add_metric((kind,), n)
        yield errors
        yield CounterMetricFamily("prescient_gateway_retries", "Forwarding attempts repeated "
                                  "on another instance before the first byte.", value=m.retries)
        yield CounterMetricFamily("prescient_gateway_replays", "Broken streams resumed on "
                                  "another instance by token replay.", value=m.replays)
        yield CounterMetricFamily("prescient_gateway_migrations", "Running streams moved to "
                                  "another instance by token replay (POST /admin/migrate).",
                                  value=m.migrations)
        yield CounterMetricFamily("prescient_gateway_fallbacks", "Requests placed by local "
                                  "round-robin because the scheduler was unavailable.",
                                  value=m.fallbacks)
        yield GaugeMetricFamily("prescient_gateway_requests_in_flight", "Requests being "
                                "scheduled or forwarded now.", value=m.in_flight)
        yield _histogram("prescient_gateway_schedule_duration_seconds",
                         "Time to place a request (scheduler call, waits included).",
                         m.schedule_seconds)
        yield _histogram("prescient_gateway_ttft_seconds", "Streaming requests: request "
                         "received to the first body byte sent.", m.ttft_seconds)
        yield _histogram("prescient_gateway_tpot_seconds", "Streaming requests: mean time "
                         "between SSE events after the first.", m.tpot_seconds)


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=h.buckets(), sum_value=h.total)
