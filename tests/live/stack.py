"""A whole Prescient stack as real processes: sim-engines, scheduler services and gateways.

`Stack` starts each `python -m prescient ...` child with its output in a log file of its own,
waits for all of them to listen at once (a 2-core machine starts five interpreters faster in
parallel), and stops them at the end. `Stack.diagnosis()` wraps a test body so that any failure
carries the tail of every child's log: the message says which process to look at.

The helpers read the processes' own endpoints (`/metrics`, `/health`) over plain HTTP; the
tests talk to the gateways with the official `openai` client.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .harness import RedisTarget, child, free_port

MODEL = "prescient-sim"
LOG_TAIL_CHARS = 1500
T = TypeVar("T")


@dataclass
class Service:
    """One child process: what it is, where it listens and where its output goes."""

    name: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs (the llumlet cannot delete its keys)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"--- {self.name} ({state}; log {self.log}) ---\n{text[-LOG_TAIL_CHARS:]}"


class Stack:
    """Children started by `start`, stopped by `close` (SIGTERM, then SIGKILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.services: dict[str, Service] = {}
        self._exit = ExitStack()

    def start(self, specs: Sequence[tuple[str, Callable[[int], list[str]]]],
              timeout_s: float = 20.0) -> list[Service]:
        """Start one child per `(name, args_for_port)` and wait until all of them listen."""
        started = []
        for name, args_for in specs:
            port = free_port()
            log = self.logs / f"{name}.log"
            proc = self._exit.enter_context(child(args_for(port), log=log))
            service = Service(name, port, log, proc)
            self.services[name] = service
            started.append(service)
        deadline = time.monotonic() + timeout_s
        for service in started:
            wait_until(lambda s=service: _listening(s), deadline - time.monotonic(),
                       f"{service.name} to listen on {service.port}", self)
        return started

    def close(self) -> None:
        # SIGTERM to all first: they shut down in parallel, then each is reaped (or killed)
        for service in self.services.values():
            if service.proc.poll() is None:
                service.proc.terminate()
        self._exit.close()

    def report(self) -> str:
        return "\n".join(s.tail() for s in self.services.values())

    @contextmanager
    def diagnosis(self) -> Iterator[None]:
        """Any failure inside gets every child's log tail as a note."""
        try:
            yield
        except BaseException as e:
            e.add_note("child process logs (newest last):\n" + self.report())
            raise


def _listening(service: Service) -> bool:
    if service.proc.poll() is not None:
        raise AssertionError(f"{service.name} exited with {service.proc.returncode} "
                             f"before listening; see {service.log}")
    try:
        http_get(service.url + "/health", timeout_s=0.5)
    except OSError:
        return False
    return True


def wait_until(ready: Callable[[], T], timeout_s: float, what: str,
               stack: Stack | None = None, interval_s: float = 0.05) -> T:
    """Poll `ready()` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = ("\n" + stack.report()) if stack is not None else ""
            raise TimeoutError(f"waited {timeout_s:.1f} s for {what}{detail}")
        time.sleep(interval_s)


# ---- HTTP --------------------------------------------------------------------------------------


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET `url`: (status, body), also for 4xx/5xx answers; OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post(url: str, body: bytes, timeout_s: float = 10.0,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """POST raw bytes as JSON: (status, decoded JSON answer)."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(service: Service, name: str, **labels: str) -> float:
    """The sum of the samples of `name` on `service`'s /metrics whose labels include `labels`."""
    status, body = http_get(service.url + "/metrics")
    assert status == 200, f"{service.name} /metrics answered {status}; see {service.log}"
    total = 0.0
    for line in body.decode().splitlines():
        m = re.match(r"([^{\s]+)(?:\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def successes(engines: Sequence[Service]) -> dict[str, float]:
    """Requests each engine finished (vLLM's `vllm:request_success_total`)."""
    return {e.name: metric(e, "vllm:request_success_total") for e in engines}


def health(service: Service) -> dict[str, Any]:
    status, body = http_get(service.url + "/health")
    answer: dict[str, Any] = json.loads(body) if body else {}
    answer["http_status"] = status
    return answer


# ---- the processes' arguments ------------------------------------------------------------------


def engine_args(redis: RedisTarget, *, time_scale: float = 20.0, ttl_s: float = 3.0,
                heartbeat_s: float = 1.0) -> Callable[[int], list[str]]:
    """A sim-engine whose llumlet writes to `redis`; keys expire `ttl_s` after its last write.
    Metadata heartbeats and idle-engine status pulls come every `heartbeat_s`."""
    return lambda port: [
        "sim-engine", "--host", "127.0.0.1", "--port", str(port), "--model", MODEL,
        "--time-scale", str(time_scale), "--enable-llumlet", "--cms-redis-host", redis.host,
        "--cms-redis-port", str(redis.port), "--cms-redis-db", str(redis.db),
        "--cms-ttl-s", str(ttl_s), "--llumlet-status-push-interval-s", "0.02",
        "--llumlet-metadata-push-interval-s", str(heartbeat_s),
        "--llumlet-engine-timeout-s", str(heartbeat_s)]


def cms_flags(redis: RedisTarget) -> list[str]:
    """The CMS flags a scheduler (or an embedded one) reads `redis` with, polling fast."""
    return ["--cms-redis-host", redis.host, "--cms-redis-port", str(redis.port),
            "--cms-redis-db", str(redis.db), "--cms-redis-timeout", "0.5",
            "--cms-pull-status-interval-ms", "50", "--cms-pull-metadata-interval-ms", "200"]


def scheduler_args(*flags: str) -> Callable[[int], list[str]]:
    return lambda port: ["scheduler", "--host", "127.0.0.1", "--port", str(port), *flags]


def gateway_args(engines: Sequence[Service], *flags: str) -> Callable[[int], list[str]]:
    """A gateway whose fallback (and lite-mode) instances are `engines`."""
    return lambda port: [
        "gateway", "--host", "127.0.0.1", "--port", str(port), "--llm-backend-endpoints",
        ",".join(e.address for e in engines), "--served-model-name", MODEL, *flags]
