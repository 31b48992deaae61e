"""Prefill/decode disaggregation: each request prefilled on one instance, decoded on another.

Upstream's two-stage forwarding (reference §8.3), `--pd-disagg-protocol`:

1. place the legs: `pd_batch` asks the scheduler for a prefill and a decode instance in one
   call; `pd_staged` (`--separate-pd-scheduling`) asks for the prefill instance only, and for the
   decode instance after the prefill finished (`scheduling_stage=decode`), so the decode lands
   on the then least-loaded one;
2. the prefill request: the client's body with `max_tokens=1`, `stream=false`, no
   `stream_options`, and `kv_transfer_params.do_remote_decode=true`; its JSON answer is read
   whole;
3. the decode request: the client's body plus `kv_transfer_params` (vllm-mooncake: those the
   prefill answered; vllm-kvt: the prefill instance's KV-transfer address), streamed (or not) to
   the client exactly as a neutral request.

Retries work as for a neutral request: until the decode's first byte reached the client, a
failed leg (connection refused, 5xx, cut short) releases the request's account, avoids the
instance, and the request starts over from step 1 (a new prefill: the failed attempt's KV is
not relied upon). Release on success follows the mode: full mode leaves it to the engines' next
CMS statuses; lite mode releases every leg at the end and, in `pd_staged`, the prefill instance
as soon as its answer arrived (upstream's OnPostPrefill; `pd_batch` cannot: a release frees
the whole request id, decode leg included).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

import msgspec

from prescient.gateway.balancer import Address, NoWorkerError
from prescient.gateway.proxy import CLIENT_GONE, Proxy, _Retry, forward_headers, id_header
from prescient.http.client import UpstreamConnectError, UpstreamError
from prescient.http.server import Request, Response
from prescient.openai_api import error_body
from prescient.scheduler.wire import LLMInstance, ScheduleRequest

log = logging.getLogger(__name__)

Protocol = Literal["vllm-kvt", "vllm-mooncake"]

# vllm-mooncake's prefill request parameters, as upstream's forwarder writes them
_PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False,
                   "remote_engine_id": None, "remote_block_ids": None,
                   "remote_host": None, "remote_port": None}


class _Answer:
    """The prefill leg failed for good (a 4xx, or a 5xx on the last attempt): relay it."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body


class _Job:
    """One client request on its way through the legs."""

    __slots__ = ("avoid", "body", "headers", "prefill_body", "request", "response", "schedule",
                 "started", "stream")

    def __init__(self, request: Request, response: Response, schedule: ScheduleRequest,
                 stream: bool, started: float) -> None:
        self.request, self.response, self.schedule = request, response, schedule
        self.stream, self.started = stream, started
        self.body: dict[str, Any] = msgspec.json.decode(request.body)  # validated already
        self.prefill_body = prefill_request(self.body)
        self.headers = forward_headers(request.headers, schedule.id)
        self.avoid: list[Address] = []


class PdForwarder:
    """Forwards each request as a prefill leg and a decode leg (see the module docstring)."""

    def __init__(self, proxy: Proxy, protocol: Protocol, *, staged: bool) -> None:
        self.proxy = proxy
        self.protocol = protocol
        self.staged = staged

    async def forward(self, request: Request, response: Response, schedule: ScheduleRequest,
                      stream: bool, started: float) -> int:
        """Place both legs, prefill, decode and answer; returns the client's status."""
        proxy, balancer, metrics = self.proxy, self.proxy.balancer, self.proxy.metrics
        job = _Job(request, response, schedule, stream, started)
        schedule.scheduling_mode = "pd_staged" if self.staged else "pd_batch"
        last: _Retry | None = None
        for attempt in range(proxy.retry_max_count + 1):
            if attempt:
                metrics.retries += 1
                await asyncio.sleep(min(0.01 * 2 ** (attempt - 1), 0.1))
            held: list[LLMInstance] = []  # accounted by the scheduler: release on failure
            try:
                outcome, ran_on = await self._attempt(job, attempt == proxy.retry_max_count,
                                                      held)
            except NoWorkerError as e:
                if held:
                    await balancer.release(schedule, *held)
                metrics.error("no_instance")
                response.send(503, error_body(503, str(e), type="service_unavailable"))
                return 503
            if not isinstance(outcome, _Retry):
                if held and proxy.release_finished:
                    await balancer.release(schedule, *held)
                return outcome
            if held:
                await balancer.release(schedule, *held)
            if request.is_disconnected:
                return CLIENT_GONE
            metrics.error(outcome.reason)
            endpoint = ran_on.endpoint
            log.info("request %s: %s:%d failed (%s), attempt %d of %d", schedule.id,
                     endpoint.host, endpoint.port, outcome.error, attempt + 1,
                     proxy.retry_max_count + 1)
            job.avoid.append((endpoint.host, endpoint.port))
            last = outcome
        message = f"upstream failed after {proxy.retry_max_count + 1} attempts: " + (
            last.error if last else "")
        response.send(502, error_body(502, message, type="upstream_error"))
        return 502

    async def _attempt(self, job: _Job, final: bool, held: list[LLMInstance]
                       ) -> tuple[int | _Retry, LLMInstance]:
        """One try of both legs; returns the outcome and the instance it last ran on."""
        schedule = job.schedule
        schedule.scheduling_stage = "prefill" if self.staged else ""
        legs = await self._place(schedule, job.avoid, held)
        prefill = legs[0]
        answer = await self._prefill(job, prefill, final)
        if isinstance(answer, _Retry):
            return answer, prefill
        if isinstance(answer, _Answer):
            job.response.send(answer.status, answer.body, id_header(schedule.id))
            return answer.status, prefill
        if self.staged:
            if held and self.proxy.release_finished:
                # the prefill instance is done with it (upstream's lite-mode OnPostPrefill);
                # a release frees the whole id, so only before the decode leg is placed
                await self.proxy.balancer.release(schedule, *held)
                held.clear()
            schedule.scheduling_stage = "decode"
            decode = (await self._place(schedule, job.avoid, held))[0]
        else:
            decode = legs[1]
        decode_body = msgspec.json.encode(
            {**job.body, "kv_transfer_params": self._decode_params(answer, prefill)})
        outcome = await self.proxy._attempt(job.request, job.response, decode, job.headers,
                                            schedule, job.stream, job.started, final,
                                            body=decode_body)
        return outcome, decode

    async def _place(self, schedule: ScheduleRequest, avoid: list[Address],
                     held: list[LLMInstance]) -> list[LLMInstance]:
        clock = self.proxy._clock
        t = clock()
        legs, accounted = await self.proxy.balancer.pick_legs(schedule, avoid)
        self.proxy.metrics.schedule_seconds.observe(clock() - t)
        if accounted:
            held.extend(legs)
        return legs

    async def _prefill(self, job: _Job, instance: LLMInstance,
                       final: bool) -> dict[str, Any] | _Retry | _Answer:
        """The prefill leg: its `kv_transfer_params`, a retry, or an answer to relay."""
        endpoint, request = instance.endpoint, job.request
        if request.is_disconnected:
            return _Retry("client_disconnect", "client left before forwarding")
        try:
            upstream = await self.proxy.pool.request(
                endpoint.host, endpoint.port, "POST", request.path, job.headers,
                job.prefill_body, connect_timeout=self.proxy.connect_timeout,
                abort_when=request)
            answer = await upstream.read()
        except UpstreamConnectError as e:
            self.proxy.balancer.mark_failed((endpoint.host, endpoint.port))
            return _Retry("upstream_connect", str(e))
        except UpstreamError as e:
            return _Retry("upstream_closed", str(e))
        if upstream.status != 200:
            if upstream.status >= 500 and not final:
                text = answer[:200].decode("utf-8", "replace")
                return _Retry("upstream_status", f"prefill HTTP {upstream.status} {text}")
            return _Answer(upstream.status, answer)
        try:
            params = msgspec.json.decode(answer).get("kv_transfer_params")
        except (msgspec.DecodeError, AttributeError):
            return _Retry("upstream_status", "prefill answered 200 without a JSON object")
        return params if isinstance(params, dict) else {}

    def _decode_params(self, answer: dict[str, Any], prefill: LLMInstance) -> dict[str, Any]:
        if self.protocol == "vllm-kvt":  # the connector pulls from the prefill's KVT address
            return {"remote_host": prefill.aux_ip or prefill.endpoint.host,
                    "remote_port": prefill.aux_port or prefill.endpoint.port,
                    "do_remote_prefill": True}
        if not answer:  # an engine that returned none: say where the prefill ran
            return {"do_remote_prefill": True, "do_remote_decode": False,
                    "remote_engine_id": prefill.id, "remote_block_ids": None,
                    "remote_host": prefill.endpoint.host, "remote_port": prefill.endpoint.port}
        return answer


def prefill_request(body: dict[str, Any]) -> bytes:
    """The prefill leg's body: one token, not streamed, asking for the decode's parameters."""
    out = {k: v for k, v in body.items() if k != "stream_options"}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out["kv_transfer_params"] = dict(_PREFILL_PARAMS)
    return msgspec.json.encode(out)
