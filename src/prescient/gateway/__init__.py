"""The OpenAI-compatible gateway: parse, schedule, forward, stream back (`prescient gateway`).

`parse` validates and tokenizes a client request, `balancer` asks the scheduler (or falls back
to round-robin), `proxy` forwards with retries before the first byte, `app` holds the routes,
`wiring` builds the parts from `GatewaySettings`, `cli` runs it.
"""

from prescient.gateway.app import Gateway
from prescient.gateway.balancer import Balancer, NoWorkerError
from prescient.gateway.metrics import GatewayMetrics
from prescient.gateway.parse import ParsedRequest, parse_request
from prescient.gateway.proxy import Proxy, forward_headers

__all__ = [
    "Balancer",
    "Gateway",
    "GatewayMetrics",
    "NoWorkerError",
    "ParsedRequest",
    "Proxy",
    "forward_headers",
    "parse_request",
]
