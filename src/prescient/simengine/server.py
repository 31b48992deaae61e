"""The simulated engine behind vLLM's OpenAI-compatible HTTP API.

A stand-in for one vLLM instance: the gateway, the scheduler's CMS and the benchmarks cannot
tell the difference by the wire. Endpoints and behaviour follow vLLM's server
(reference/vllm-cpu.md §4-§5):

    POST /v1/completions, /v1/chat/completions   stream or not; `usage`; include_usage and
                                                 continuous_usage_stats chunks; chat's
                                                 add_generation_prompt and
                                                 continue_final_message; 400/404 as vLLM
    GET  /v1/models, /health, /metrics           vLLM's metric names (simengine/metrics.py)
    POST /tokenize, /detokenize                  vLLM's shapes
    GET  /kv_event_sources                       where `--kv-events-config` publishes the
                                                 prefix cache's KV events (kv_publisher.py)

P/D disaggregation follows vLLM's `kv_transfer_params` convention (simengine/pd.py): a
`do_remote_decode` request's non-streamed answer carries the parameters for the decode leg; a
`do_remote_prefill` request waits a modelled KV transfer and skips its prompt's prefill.

Generated tokens are pseudo-text drawn from the tokenizer's common-word ids, seeded by the
request id, so a retried request gets the same text. Every request generates exactly its
`max_tokens` (finish_reason "length"; `ignore_eos` is accepted and changes nothing). Without
`max_tokens` it generates `--default-max-tokens`, capped by the remaining context.

The engine request id is the caller's `x-request-id` (the gateway forces it), undecorated, so
the statuses this engine reports carry the ids the scheduler's local account dispatched. A
second live request with the same id gets `<id>+dup<n>`, which `normalize_request_id` maps
back. Response ids are vLLM's `cmpl-<id>` / `chatcmpl-<id>`, and the header is echoed.

A client that goes away aborts its request: a streaming write fails, or (with
`handler_cancellation=True`, as `start_server` sets) the handler is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from aiohttp import web

from prescient.config.presets import get_preset
from prescient.config.sim_engine import SimEngineSettings
from prescient.engine import EngineConfig, SimEngine
from prescient.errors import ConfigError
from prescient.model import InferType, InstanceMetadata, InstanceStatus, Request
from prescient.openai_api import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    decode_request,
    error_body,
)
from prescient.rescheduler.migration import MigrationSettings
from prescient.simengine.driver import FINISH_ABORT, RealtimeEngine, TokenStream
from prescient.simengine.kv_publisher import attach_publisher, parse_kv_events_config
from prescient.simengine.metrics import CONTENT_TYPE, EngineMetrics
from prescient.simengine.migration import FINISH_LOST, LiveMigration, migration_slots
from prescient.simengine.pd import (
    prefill_answer,
    read_kv_transfer,
    transfer_time_s,
    with_kv_transfer,
)
from prescient.simengine.responses import Detokenizer, Reply
from prescient.tokenizer import ApproxTokenizer, HfTokenizer, load_tokenizer

if TYPE_CHECKING:
    from prescient.cms.store import CmsStore

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # a 128k-token prompt as JSON ids is ~1 MB


def make_engine(settings: SimEngineSettings) -> SimEngine:
    """The engine `settings` describe (preset, overrides, limits)."""
    preset = get_preset(settings.preset)
    try:
        config = EngineConfig(
            num_gpu_blocks=settings.num_gpu_blocks or preset.num_gpu_blocks,
            block_size=settings.block_size or preset.block_size,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=settings.max_model_len,
            batching=settings.batching,
            enable_prefix_caching=settings.enable_prefix_caching,
            enable_profiling=settings.enable_profiling,
            profiling_steps=settings.profiling_steps,
            idle_wakeup_ms=preset.idle_wakeup_ms,
        )
    except ValueError as e:
        raise ConfigError(f"sim-engine flags: {e}") from None
    return SimEngine(settings.resolved_instance_id, config, preset.step_model,
                     skip_decode_runs=False)


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's `/tokenize` body: a prompt, or chat messages to template first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


class SimEngineServer:
    """The engine, its driver, tokenizer and metrics, and the HTTP handlers over them.

    `store` is the CMS the llumlet writes to (with `--enable-llumlet`) when the caller has one,
    e.g. the in-memory store of `prescient serve`; the caller closes it. None: a `RedisStore`
    from the `--cms-redis-*` flags, owned by the server.
    """

    def __init__(self, settings: SimEngineSettings,
                 tokenizer: ApproxTokenizer | HfTokenizer | None = None, *,
                 store: CmsStore | None = None) -> None:
        self.settings = settings
        self._store = store
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(
            settings.tokenizer)
        self.engine = make_engine(settings)
        self.kv_bytes_per_token = get_preset(settings.preset).kv_bytes_per_token
        # statuses cost a snapshot per step: compute them only for a llumlet
        on_status = self._on_status if settings.enable_llumlet else None
        self.driver = RealtimeEngine(self.engine, time_scale=settings.time_scale,
                                     on_status=on_status,
                                     vocabulary=self.tokenizer.known_ids())
        config = self.engine.config
        self.metrics = EngineMetrics(settings.model, self.driver.snapshot,
                                     block_size=config.block_size,
                                     num_gpu_blocks=config.num_gpu_blocks,
                                     enable_prefix_caching=config.enable_prefix_caching)
        self.kv_events_config = parse_kv_events_config(settings.kv_events_config)
        self.kv_events = attach_publisher(self.engine, self.kv_events_config,
                                          settings.prefix_caching_hash_algo, os.environ)
        self.llumlet: Any = None  # prescient.llumlet.agent.Llumlet when --enable-llumlet
        self.migration: LiveMigration | None = None  # with --llumlet-port
        self.created = int(time.time())

    # ---- lifecycle ---------------------------------------------------------------------------

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: run the engine (and the llumlet) while the app runs."""
        grpc_server = watch_task = None
        if self.settings.llumlet_port:  # first: a busy port fails before anything runs
            grpc_server, watch_task = await self._start_migration()
        if self.kv_events is not None:
            await self.kv_events.start()
        engine_task = asyncio.create_task(self.driver.run(), name="sim-engine")
        own_store = llumlet_task = None
        if self.settings.enable_llumlet:
            own_store, llumlet_task = self._start_llumlet()
        try:
            yield
        finally:
            if self.llumlet is not None:
                await self.llumlet.stop()  # deletes the instance's CMS keys
            if grpc_server is not None:
                await grpc_server.stop(0)
            if self.migration is not None:
                await self.migration.close()
            for task in (watch_task, llumlet_task, engine_task):
                if task is not None:
                    task.cancel()
                    # an engine failure was logged when it happened; shutdown goes on
                    await asyncio.gather(task, return_exceptions=True)
            if own_store is not None:
                await own_store.close()
            if self.kv_events is not None:
                await self.kv_events.close()

    async def _start_migration(self) -> tuple[Any, asyncio.Task[None]]:
        """Serve the llumlet's gRPC service; returns the server and the owners' watchdog."""
        from prescient.llumlet.rpc import start_server

        s = self.settings
        self.migration = LiveMigration(
            self.driver, s.resolved_instance_id, f"{s.advertise_host}:{s.llumlet_port}",
            kv_bytes_per_token=self.kv_bytes_per_token, time_scale=s.time_scale,
            settings=MigrationSettings(bandwidth_gb_s=s.kv_transfer_bandwidth_gb_s,
                                       rpc_latency_ms=0.0, **migration_slots(os.environ)),
            on_status=self._on_status, metrics=self.metrics)
        try:
            server, _ = await start_server(self.migration, s.host, s.llumlet_port)
        except OSError as e:
            raise ConfigError(f"--llumlet-port {s.llumlet_port}: {e}") from None
        return server, asyncio.create_task(self.migration.watch(), name="migration-watch")

    def _start_llumlet(self) -> tuple[Any, asyncio.Task[None]]:
        """Start the llumlet; returns the store it made (to close), or None, and its task."""
        from prescient.llumlet.agent import Llumlet
        from prescient.llumlet.sources import SnapshotSource

        s = self.settings
        store, own_store = self._store, None
        if store is None:
            from prescient.cms.redis_store import RedisStore

            store = own_store = RedisStore(
                s.cms_redis_host, s.cms_redis_port, db=s.cms_redis_db,
                username=s.cms_redis_username, password=s.cms_redis_password)
        self.llumlet = Llumlet(
            store, self.metadata(), source=SnapshotSource(self.driver.snapshot),
            push_interval_s=s.llumlet_status_push_interval_s,
            metadata_interval_s=s.llumlet_metadata_push_interval_s,
            ttl_s=s.cms_ttl_s or None, engine_timeout_s=s.llumlet_engine_timeout_s)
        self.llumlet.push(self.driver.snapshot())  # schedulable from the first write
        return own_store, asyncio.create_task(self.llumlet.run(), name="llumlet")

    def metadata(self) -> InstanceMetadata:
        """This instance as the CMS registers it."""
        s, config = self.settings, self.engine.config
        return InstanceMetadata(
            instance_id=s.resolved_instance_id, instance_type=InferType(s.instance_type),
            backend_type="prescient-sim", ip=s.advertise_host, ip_kvs=s.advertise_host,
            api_server_port=s.port, unit_id=s.resolved_instance_id,
            llumlet_port=s.llumlet_port, kvt_port=s.llumlet_port,
            block_size=config.block_size, max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs)

    def _on_status(self, status: InstanceStatus) -> None:
        if self.llumlet is not None:
            self.llumlet.push(status)

    # ---- generation ------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request,
                        kind: Literal["completion", "chat"]) -> web.StreamResponse:
        raw = await request.read()
        api = decode_request(raw, kind)
        self._check_model(api.model)
        prompt = self._prompt_ids(api)
        max_tokens = self._max_tokens(api.limit(), len(prompt))
        base_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        kv = read_kv_transfer(raw)
        prefilled = kv is not None and kv.do_remote_prefill
        if prefilled:
            await self._receive_kv(len(prompt))
        engine_id = self._unique_id(base_id)
        try:
            stream = self.driver.submit(Request(
                request_id=engine_id, prompt_len=len(prompt), output_len=max_tokens,
                prompt_token_ids=tuple(prompt), arrival_time=self.driver.now()),
                prefilled=prefilled)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:
            raise ApiError(503, str(e), type="ServiceUnavailableError") from None
        if prefilled:  # all but the last prompt token (recomputed for the first token's logits)
            self.metrics.kv_received(max(0, len(prompt) - 1))
        reply = Reply(kind, base_id, self.settings.model, len(prompt))
        try:
            if api.stream:
                options = api.stream_options
                return await self._stream(request, stream, reply,
                                          usage=bool(options and options.include_usage),
                                          continuous=bool(options and
                                                          options.continuous_usage_stats))
            kv_answer = None
            if kv is not None and kv.do_remote_decode:
                kv_answer = prefill_answer(
                    self.settings.resolved_instance_id, self.settings.advertise_host,
                    self.settings.port, len(prompt), self.engine.config.block_size)
            return await self._collect(stream, reply, kv_answer)
        finally:
            if stream.finish_reason is None and not self.driver.abort(engine_id) and (
                    self.migration is not None):
                self.migration.abort_away(engine_id)  # it runs elsewhere now
            self._record_finish(stream)

    async def _receive_kv(self, prompt_len: int) -> None:
        """P/D decode leg: wait while the prompt's KV crosses the link from the prefill
        instance (modelled, in engine time)."""
        seconds = transfer_time_s(prompt_len, self.kv_bytes_per_token,
                                  self.settings.kv_transfer_bandwidth_gb_s)
        await asyncio.sleep(seconds / self.settings.time_scale)

    async def _collect(self, stream: TokenStream, reply: Reply,
                       kv_answer: dict[str, Any] | None = None) -> web.Response:
        ids: list[int] = []
        last: float | None = None
        async for batch in stream:
            last = self._record_batch(stream, not ids, len(batch), last)
            ids += batch
        if stream.finish_reason in (FINISH_ABORT, FINISH_LOST):
            raise ApiError(503, "the engine stopped before the request finished",
                           type="ServiceUnavailableError")
        body = reply.body(self.tokenizer.decode(ids), stream.finish_reason or "", len(ids))
        if kv_answer is not None:
            body = with_kv_transfer(body, kv_answer)
        return web.Response(body=body, content_type="application/json")

    async def _stream(self, request: web.Request, stream: TokenStream, reply: Reply, *,
                      usage: bool, continuous: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        _echo_request_id(request, response)
        detok, n, final = Detokenizer(self.tokenizer), 0, False
        last: float | None = None
        try:
            await response.prepare(request)
            if reply.chat:
                running = reply.usage(0) if continuous else None
                await response.write(reply.chunk("", role=True, usage=running))
            async for batch in stream:
                if stream.finish_reason == FINISH_LOST:
                    break
                last = self._record_batch(stream, n == 0, len(batch), last)
                n += len(batch)
                reason = stream.finish_reason if stream.drained else None
                running = reply.usage(n) if continuous else None
                await response.write(reply.chunk(detok.push(batch), reason, running))
                final = reason is not None
            if stream.finish_reason == FINISH_LOST and request.transport is not None:
                # lost in migration: break the connection, as a dead engine would, so that
                # a gateway replays the request elsewhere
                request.transport.close()
                return response
            if not final:
                await response.write(reply.chunk("", stream.finish_reason or FINISH_ABORT))
            if usage:
                await response.write(reply.usage_chunk(n))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            logger.debug("client of %s went away mid-stream", stream.request_id)
        return response

    def _record_batch(self, stream: TokenStream, first: bool, n: int,
                      previous: float | None) -> float | None:
        """Metrics of a batch of `n` tokens; returns the engine time of its last token."""
        now = stream.last_token_time
        if first and stream.first_token_time is not None:
            self.metrics.first_token(stream.prompt_len,
                                     stream.first_token_time - stream.arrival_time,
                                     stream.num_cached_tokens)
        gap = None if previous is None or now is None else now - previous
        self.metrics.tokens(n, gap)
        return now

    def _record_finish(self, stream: TokenStream) -> None:
        end = stream.finish_time if stream.finish_time is not None else self.driver.now()
        first, n = stream.first_token_time, stream.num_tokens
        tpot = (end - first) / (n - 1) if first is not None and n > 1 else None
        self.metrics.finished(stream.finish_reason or FINISH_ABORT, end - stream.arrival_time,
                              tpot)

    # ---- request checks ----------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model:
            raise ApiError(404, f"The model `{model}` does not exist.", type="NotFoundError",
                           param="model")

    def _prompt_ids(self, api: CompletionRequest | ChatCompletionRequest) -> list[int]:
        tok = self.tokenizer
        if isinstance(api, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in api.messages]
            try:
                text = tok.apply_chat_template(
                    messages, add_generation_prompt=api.add_generation_prompt,
                    continue_final_message=api.continue_final_message)
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
            ids = tok.encode(text, add_special_tokens=False)
        elif isinstance(api.prompt, str):
            ids = tok.encode(api.prompt)
        elif all(isinstance(p, int) for p in api.prompt):
            ids = list(api.prompt)  # type: ignore[arg-type]
        elif len(api.prompt) != 1:
            raise ApiError(400, f"only one prompt per request is supported, got "
                                f"{len(api.prompt)}", param="prompt")
        else:
            one = api.prompt[0]
            ids = tok.encode(one) if isinstance(one, str) else list(one)  # type: ignore[arg-type]
        self._check_ids(ids)
        return ids

    def _check_ids(self, ids: list[int]) -> None:
        """Non-empty, and ids in the vocabulary. The approximate tokenizer decodes any id, so
        it takes ids from a gateway whose (real) tokenizer has a larger vocabulary."""
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
        tok = self.tokenizer
        vocab = tok.vocab_size if isinstance(tok, HfTokenizer) else 2**31
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise ApiError(400, f"Token id {bad} is out of vocabulary", param="prompt")

    def _max_tokens(self, limit: int | None, prompt_len: int) -> int:
        max_len = self.settings.max_model_len
        room = max_len - prompt_len
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {max_len} tokens. "
                                f"However, your request has {prompt_len} input tokens. Please "
                                "reduce the length of the input messages.")
        if limit is None:
            default = self.settings.default_max_tokens
            return min(room, default) if default else room
        if limit > room:
            raise ApiError(400, f"'max_tokens' or 'max_completion_tokens' is too large: "
                                f"{limit}. This model's maximum context length is {max_len} "
                                f"tokens and your request has {prompt_len} input tokens "
                                f"({limit} > {max_len} - {prompt_len}).", param="max_tokens")
        return limit

    def _unique_id(self, base: str) -> str:
        rid, n = base, 0
        while self.driver.is_live(rid) or (self.migration is not None
                                           and self.migration.is_away(rid)):
            n += 1
            rid = f"{base}+dup{n}"
        return rid

    # ---- the other endpoints -----------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        model = self.settings.model
        card = {"id": model, "object": "model", "created": self.created,
                "owned_by": "prescient", "root": model, "parent": None,
                "max_model_len": self.settings.max_model_len, "permission": []}
        return _json({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.driver.error is None else 503)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = _decode(await request.read(), TokenizeRequest)
        self._check_model(body.model)
        tok = self.tokenizer
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                text = tok.apply_chat_template(messages)
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
            ids = tok.encode(text, add_special_tokens=bool(body.add_special_tokens))
        elif body.prompt is not None:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = tok.encode(body.prompt, add_special_tokens=special)
        else:
            raise ApiError(400, "give either prompt or messages", param="prompt")
        return _json({"count": len(ids), "max_model_len": self.settings.max_model_len,
                      "tokens": ids, "token_strs": None})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = _decode(await request.read(), DetokenizeRequest)
        self._check_model(body.model)
        return _json({"prompt": self.tokenizer.decode(body.tokens)})

    async def kv_event_sources(self, request: web.Request) -> web.Response:
        """vLLM's `GET /kv_event_sources`: where this engine publishes, per DP rank."""
        config = self.kv_events_config
        return _json(config.sources() if config is not None and config.publishes else {})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status,
                        content_type="application/json")


def _decode(body: bytes, cls: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        raise ApiError(400, f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None


def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.headers.get("x-request-id")
    if rid and not response.prepared:
        response.headers["x-request-id"] = rid


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure as an OpenAI error body, never a traceback; echo `x-request-id`."""
    try:
        response = await handler(request)
    except ApiError as e:
        response = web.Response(body=e.body(), status=e.status, content_type="application/json")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = web.Response(body=error_body(e.status, e.reason, type=e.reason),
                                status=e.status, content_type="application/json")
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        response = web.Response(body=error_body(500, "internal error", type="InternalServerError"),
                                status=500, content_type="application/json")
    _echo_request_id(request, response)
    return response


SERVER_KEY = web.AppKey("sim_engine_server", SimEngineServer)


def build_app(settings: SimEngineSettings,
              tokenizer: ApproxTokenizer | HfTokenizer | None = None, *,
              store: CmsStore | None = None) -> web.Application:
    """The aiohttp application; the engine (and llumlet) run while the app is started.

    `store`: the CMS the llumlet writes to instead of Redis (see `SimEngineServer`).

    Raises:
        ConfigError: the preset, tokenizer or engine limits are wrong.
    """
    server = SimEngineServer(settings, tokenizer, store=store)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    app[SERVER_KEY] = server
    app.cleanup_ctx.append(server.lifespan)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.chat_completions)
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/health", server.health)
    app.router.add_post("/tokenize", server.tokenize)
    app.router.add_post("/detokenize", server.detokenize)
    app.router.add_get("/metrics", server.metrics_page)
    app.router.add_get("/kv_event_sources", server.kv_event_sources)
    return app


async def start_server(settings: SimEngineSettings,
                       tokenizer: ApproxTokenizer | HfTokenizer | None = None,
                       app: web.Application | None = None, *,
                       sock: socket.socket | None = None) -> web.AppRunner:
    """Build (unless given), start and bind the app on --host/--port, or serve on `sock`, a
    socket the caller bound already (one on port 0 whose port went into `settings.port`: no
    race for a free port); `await runner.cleanup()` stops it. Handlers are cancelled when
    their client disconnects, which aborts requests."""
    app = app if app is not None else build_app(settings, tokenizer)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if sock is None:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=2048)
    else:
        site = web.SockSite(runner, sock, backlog=2048)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(f"--port {settings.port}: cannot listen on {settings.host}:"
                          f"{settings.port}: {e.strerror or e}") from None
    return runner
