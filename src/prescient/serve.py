"""`prescient serve`: the whole live stack in one process, for a first run and for demos.

The multi-process deployment is a gateway (and scheduler) plus engines with llumlets, talking
through a Redis CMS. Here the same parts run in one event loop so that `pip install` and one
command give a working OpenAI endpoint with real scheduling behind it:

- `--num-engines` simulated engines (`prescient.simengine`), each served by its own aiohttp app
  on an ephemeral loopback port, with its built-in llumlet writing metadata and statuses;
- one `MemoryStore` as the CMS, shared by those llumlets and the scheduler's reader, so no
  Redis is needed and a status is visible one poll (`--cms-pull-status-interval-ms`) later;
- the gateway with its embedded full-mode `SchedulerCore` on `--host`/`--port`, forwarding
  over real loopback HTTP, exactly as it forwards to remote engines.

Nothing is special-cased for being in one process: every request still crosses the gateway's
data plane and an engine's HTTP server, and the scheduler sees the engines only through the CMS.

Startup order matters once: the scheduler reads the CMS metadata at start and then only every
`cms_pull_metadata_interval_ms` (10 s), so the engines register first and the gateway starts
when every engine's metadata and first status are in the store; the first request is then
scheduled on all of them. Shutdown (SIGTERM/SIGINT) runs the other way: the gateway stops
accepting, lets in-flight requests finish (up to the gateway's grace period), closes; then the
engines stop and their llumlets delete their keys.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping

from aiohttp import web

from prescient import service
from prescient.cms.store import MemoryStore
from prescient.config.gateway import GatewaySettings
from prescient.config.serve import DESCRIPTION, ServeSettings, serve_parser
from prescient.config.sim_engine import SimEngineSettings
from prescient.discovery.base import StaticResolver
from prescient.errors import ConfigError
from prescient.gateway.app import Gateway
from prescient.gateway.cli import SHUTDOWN_GRACE_S
from prescient.gateway.wiring import embedded_scheduler_settings
from prescient.http.server import Listener
from prescient.scheduler.core import SchedulerCore
from prescient.simengine.server import build_app, start_server
from prescient.tokenizer import ApproxTokenizer, HfTokenizer, load_tokenizer

log = logging.getLogger("prescient.serve")

LOOPBACK = "127.0.0.1"
REGISTER_TIMEOUT_S = 10.0  # in-memory writes: the engines register within milliseconds
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `serve` (every `ServeSettings` flag plus `--print-config`) to `sub`."""
    service.add_service_parser(
        sub, "serve", help="gateway, scheduler, in-memory CMS and simulated engines in one "
        "process: an OpenAI endpoint to try", description=DESCRIPTION,
        usage="prescient serve [options]", add_flags=serve_parser)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Serve until SIGTERM/SIGINT (or print the settings); returns the exit status.

    Raises:
        ConfigError: a bad flag, env var, config file, tokenizer or port (named).
    """
    settings = service.resolve_settings(ServeSettings, args, env)
    if settings is not None:
        service.run_until_signalled(lambda stop: serve_until_signalled(settings, stop))
    return 0


async def serve_until_signalled(settings: ServeSettings, stop: asyncio.Event,
                                announce: Callable[[str], None] | None = None) -> None:
    """Start the stack, `announce` where it listens (default: print to stdout), serve until
    `stop` is set, shut down."""
    stack = LocalStack(settings)
    try:
        await stack.start()
        line = ready_line(settings, stack.url)
        if announce is None:
            print(line, flush=True)
        else:
            announce(line)
        await stop.wait()
        log.info("shutting down")
    finally:
        await stack.close()


def ready_line(settings: ServeSettings, url: str) -> str:
    """The one line that tells a user what runs and how to try it."""
    body = f'{{"model":"{settings.model}","prompt":"hi","max_tokens":8}}'
    return (f"prescient serve: OpenAI API at {url}/v1 ({settings.num_engines} x "
            f"{settings.preset} simulated, time scale {settings.time_scale:g}, "
            f"{settings.scheduling_policy}); try: curl {url}/v1/completions "
            f"-H 'Content-Type: application/json' -d '{body}'")


class ServedEngine:
    """One simulated engine of the stack: its CMS id, loopback port and HTTP runner."""

    def __init__(self, instance_id: str, sock: socket.socket) -> None:
        self.instance_id = instance_id
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


class LocalStack:
    """Engines, in-memory CMS, scheduler and gateway in this event loop.

    `await start()` brings everything up (the gateway listens on `--host`/`--port` when it
    returns); `await close()` takes it down and is safe after a failed start.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.store = MemoryStore()
        self.engines: list[ServedEngine] = []
        self.gateway: Gateway | None = None
        self._server: Listener | None = None

    @property
    def url(self) -> str:
        """The gateway's base URL, as a client on this host reaches it."""
        host = self.settings.host
        host = LOOPBACK if host in _ANY_ADDRESS else host
        return f"http://[{host}]:{self.settings.port}" if ":" in host else (
            f"http://{host}:{self.settings.port}")

    async def start(self) -> None:
        """Bind and start the engines, wait until they are in the CMS, then start the gateway.

        Raises:
            ConfigError: the tokenizer, scheduler config or gateway address is unusable.
        """
        s = self.settings
        try:
            # bound now, on port 0: each engine's port is known before its settings are made
            self.engines = [ServedEngine(f"sim-{i}", _bound_loopback_socket())
                            for i in range(s.num_engines)]
            self.gateway = gateway = self._build_gateway(self._gateway_settings())
            await self._start_engines()
            await self._wait_registered()
            await gateway.start()
            self._server = await _listen(gateway, s.host, s.port)
        except BaseException:
            await self.close()
            raise

    def _gateway_settings(self) -> GatewaySettings:
        s = self.settings
        return GatewaySettings(
            host=s.host, port=s.port, scheduling_policy=s.scheduling_policy,
            scheduler_config=s.scheduler_config, llm_backend_discovery="endpoints",
            llm_backend_endpoints=tuple(f"{LOOPBACK}:{e.port}" for e in self.engines),
            served_model_name=(s.model,), tokenizer_path=s.tokenizer,
            enable_full_mode_scheduling=True,
            cms_pull_status_interval_ms=s.cms_pull_status_interval_ms)

    def _build_gateway(self, settings: GatewaySettings) -> Gateway:
        """The gateway over the engines (static discovery: the fallback and round-robin set)
        with an embedded scheduler reading the shared in-memory CMS."""
        resolver = StaticResolver(settings.llm_backend_endpoints)
        scheduler = None
        if settings.scheduling_policy != "round-robin":
            scheduler_settings = embedded_scheduler_settings(settings)  # names a bad file key
            try:
                scheduler = SchedulerCore(scheduler_settings, store=self.store,
                                          resolver=resolver)
            except ConfigError as e:  # it names scheduler flags: say where they go here
                raise ConfigError(f"{e}; prescient serve takes scheduler settings in a "
                                  "--scheduler-config file") from None
        return Gateway(settings, scheduler=scheduler, resolver=resolver,
                       tokenizer=_load_tokenizer(self.settings.tokenizer),
                       gateway_id=f"{socket.gethostname()}:{settings.port}")

    async def _start_engines(self) -> None:
        s = self.settings
        tokenizer = _load_tokenizer(s.tokenizer)  # one for the engines, all on this loop
        for engine in self.engines:
            engine_settings = SimEngineSettings(
                host=LOOPBACK, port=engine.port, model=s.model, tokenizer=s.tokenizer,
                instance_id=engine.instance_id, advertise_host=LOOPBACK,
                time_scale=s.time_scale, preset=s.preset, enable_llumlet=True)
            app = build_app(engine_settings, tokenizer, store=self.store)
            engine.runner = await start_server(engine_settings, app=app, sock=engine.sock)
            log.info("engine %s (%s) listening on %s", engine.instance_id, s.preset, engine.url)

    async def _wait_registered(self) -> None:
        """Until every engine's metadata and first status are in the CMS."""
        ids = [e.instance_id for e in self.engines]
        deadline = time.monotonic() + REGISTER_TIMEOUT_S
        while True:
            metadata = await self.store.read_metadata()
            statuses = await self.store.read_statuses(ids)
            if all(i in metadata and statuses[i] is not None for i in ids):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"engines not in the CMS after {REGISTER_TIMEOUT_S:g} s")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        """Stop accepting, drain in-flight requests, close the gateway, then the engines."""
        server, self._server = self._server, None
        gateway, self.gateway = self.gateway, None
        if server is not None:
            server.close()
        if gateway is not None:
            await gateway.drain(SHUTDOWN_GRACE_S)
            await gateway.close()
        engines, self.engines = self.engines, []
        for engine in engines:
            if engine.runner is not None:
                await engine.runner.cleanup()  # the llumlet deletes its keys
            engine.sock.close()
        await self.store.close()


def _load_tokenizer(path: str) -> ApproxTokenizer | HfTokenizer:
    """The gateway loads its own: it may tokenize in a worker thread while engines do on the
    event loop."""
    try:
        return load_tokenizer(path or None)
    except ConfigError as e:
        raise ConfigError(f"--tokenizer: {e}") from None


def _bound_loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    return sock


async def _listen(gateway: Gateway, host: str, port: int) -> Listener:
    try:
        return await gateway.serve(host, port)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: cannot resolve: {e.strerror or e}") from e
    except OSError as e:
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port}: "
                          f"{e.strerror or e}") from e

