"""Errors Prescient raises on purpose.

    PrescientError
    ├── ConfigError                a flag, scenario file or preset is wrong
    ├── WorkloadError              a trace or workload row is malformed (names file and line)
    ├── ApiError                   an OpenAI request answered 4xx/5xx (openai_api)
    ├── PredictorNotFittedError    a step-time model asked before its warm-up (predict)
    ├── CmsCodecError, CmsStoreError, CmsUnavailableError      the CMS (cms)
    ├── NoInstanceAvailableError, SchedulerUnavailableError    scheduling (scheduler.wire)
    ├── NoWorkerError              the gateway found no instance in time (gateway.balancer)
    ├── UpstreamError              an engine connection failed (http.client): Connect,
    │                              Closed, Protocol
    ├── DiscoveryError, DiscoveryCodecError     discovery (EtcdError under DiscoveryError)
    └── LlumletRpcError            a llumlet gRPC call failed (llumlet.rpc)

Each is defined beside the code that raises it; only the first two live here.
"""

from __future__ import annotations


class PrescientError(Exception):
    """Base of every error Prescient raises deliberately."""


class ConfigError(PrescientError):
    """A configuration value is invalid; the message names the flag or key."""


class WorkloadError(PrescientError):
    """A workload or trace cannot be read; the message names the file and line."""
