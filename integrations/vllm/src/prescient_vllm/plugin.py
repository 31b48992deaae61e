"""`PrescientStatLogger`: vLLM loads it from the `vllm.stat_logger_plugins` entry point.

It runs in vLLM's API-server process, beside vLLM's own Prometheus logger, and at every engine
step pushes the status `prescient_vllm.status` builds to a `prescient llumlet` over ZMQ
(PUSH, msgpack, non-blocking, conflated: only the newest status waits in the queue, so a slow
or absent llumlet never slows the engine). The llumlet writes it to the CMS.

The plugin binds the endpoint and the llumlet connects, as with vLLM's own KV-event publisher:
the engine owns the address, statuses sent while no llumlet is connected are dropped (nothing
stale is delivered later), and a restarted llumlet reconnects at once.

Configuration is by environment, since vLLM passes a plugin nothing but its own config:

- `PRESCIENT_STATUS_ENDPOINT`: the endpoint to bind, the llumlet's `--status-endpoint` (e.g.
  `ipc:///tmp/prescient-8000.ipc`, or `tcp://0.0.0.0:5600` for a llumlet on another host);
  `{engine_index}` in it is replaced by the engine's index. Unset: the plugin stays idle and
  says so once.
- `PRESCIENT_QUIET_ITERATION_LOGS` (default 1): vLLM logs one INFO line per step when
  `--enable-logging-iteration-details` is on (which the profiling sample needs); the plugin
  drops those lines unless this is 0.
- `PRESCIENT_STEP_TRACE`: a file to append every step's timing and shape and each finished
  request's engine-side latencies to, as JSON lines (`prescient_vllm.trace`; what a simulator
  preset is calibrated from). Unset: no trace.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import Any

import msgspec
import zmq
from vllm.v1.metrics.loggers import StatLoggerBase

from prescient_vllm.status import capacity_tokens, engine_status
from prescient_vllm.trace import TRACE_ENV, StepClock, StepTrace

logger = logging.getLogger("prescient_vllm")

ENDPOINT_ENV = "PRESCIENT_STATUS_ENDPOINT"
QUIET_ENV = "PRESCIENT_QUIET_ITERATION_LOGS"


class _DropIterationLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("%sIteration(")


def _find_request_table() -> Any | None:
    """The `AsyncLLM.output_processor` constructing this logger, found up the call stack.

    vLLM gives stat loggers no handle on the engine client; the request table (which requests
    still prefill, and their prompt lengths) is the only source of per-request status fields.
    Returns None when the layout differs (another vLLM version): those fields are then absent.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            processor = getattr(owner, "output_processor", None)
            if isinstance(getattr(processor, "request_states", None), dict):
                return processor
            frame = frame.f_back
    finally:
        del frame
    return None


class PrescientStatLogger(StatLoggerBase):
    """Pushes one engine's status to its llumlet at every step."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine_index = engine_index
        self.cache_config = vllm_config.cache_config
        self.steps = 0
        self._requests = _find_request_table()
        self._encoder = msgspec.msgpack.Encoder()
        self._socket: zmq.Socket | None = None
        # one engine per output processor: with data parallelism the engines' outputs pass
        # through one processor, and their timestamps could not be told apart
        parallel = getattr(vllm_config, "parallel_config", None)
        single = getattr(parallel, "data_parallel_size", 1) == 1
        self._clock = (StepClock(self._requests)
                       if single and self._requests is not None else None)
        trace = os.environ.get(TRACE_ENV, "")
        self._trace = (StepTrace(trace.replace("{engine_index}", str(engine_index)))
                       if trace else None)
        endpoint = os.environ.get(ENDPOINT_ENV, "")
        if not endpoint:
            logger.warning("prescient: %s is not set; no status is pushed", ENDPOINT_ENV)
            return
        self.endpoint = endpoint.replace("{engine_index}", str(engine_index))
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.CONFLATE, 1)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.endpoint)
        if os.environ.get(QUIET_ENV, "1") != "0":
            logging.getLogger("vllm.v1.metrics.loggers").addFilter(_DropIterationLines())
        if self._requests is None:
            logger.warning("prescient: vLLM's request table not found; statuses carry counts "
                           "only (no request ids or token loads)")

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is None or (self._socket is None and self._trace is None):
            return
        requests = None
        if self._requests is not None:
            requests = list(self._requests.request_states.values())
        stamp, period = (None, None) if self._clock is None else self._clock.tick(
            scheduler_stats)
        if self._trace is not None:
            self._trace.record(scheduler_stats, iteration_stats, requests, stamp)
        if self._socket is None:
            return
        self.steps += 1
        capacity = capacity_tokens(self.cache_config.num_gpu_blocks, self.cache_config.block_size)
        status = engine_status(scheduler_stats, capacity=capacity, step_id=self.steps,
                               requests=requests, period_ms=period)
        # no llumlet connected yet (zmq.Again): the next step's status supersedes this one
        with contextlib.suppress(zmq.Again):
            self._socket.send(self._encoder.encode(status), zmq.NOBLOCK)

    def log_engine_initialized(self) -> None:
        if self._socket is not None:
            logger.info("prescient: pushing engine %d's status to %s", self.engine_index,
                        self.endpoint)
