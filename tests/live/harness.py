"""Real processes and services for the live-stack tests: Redis, free ports, child processes.

Tests that need Redis use the shared server at `REDIS_URL` (default redis://127.0.0.1:6379) in a
database of their own, flushed before and after; fault tests start a private `redis-server` on a
free port and stop or restart it at will, never touching the shared one.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

SHARED_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")


_GIVEN: set[int] = set()  # ports handed out in this process: the kernel may offer one again


def free_port() -> int:
    """A port nothing listens on now, and not handed out before by this process (two servers
    of one test asked for ports in a row could otherwise get the same one)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise RuntimeError("no unused port after 100 tries")


def wait_for_port(port: int, host: str = "127.0.0.1", timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:g} s")


class RedisTarget:
    """Where a test's Redis lives: host, port and database."""

    def __init__(self, host: str, port: int, db: int) -> None:
        self.host, self.port, self.db = host, port, db

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"

    def cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-h", self.host, "-p", str(self.port), "-n",
                              str(self.db), *args], capture_output=True, text=True, check=True)
        return out.stdout.strip()


@contextmanager
def shared_redis() -> Iterator[RedisTarget]:
    """A random database (1-15) of the shared Redis, flushed before and after."""
    parts = urlsplit(SHARED_REDIS_URL)
    target = RedisTarget(parts.hostname or "127.0.0.1", parts.port or 6379,
                         random.randint(1, 15))
    target.cli("FLUSHDB")
    try:
        yield target
    finally:
        target.cli("FLUSHDB")


class PrivateRedis:
    """A `redis-server` of the test's own on a free port; `stop()` and `start()` simulate an
    outage (same port, empty data)."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        self.target = RedisTarget("127.0.0.1", self.port, 0)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def child(args: Sequence[str], *, port: int | None = None, log: Path | None = None,
          env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m prescient <args>` (or any argv starting with "-") as a child process,
    wait until `port` listens, and terminate it at the end. Output goes to `log`."""
    argv = [sys.executable, "-m", "prescient", *args]
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    try:
        if port is not None:
            try:
                wait_for_port(port)
            except TimeoutError:
                proc.kill()
                detail = log.read_text()[-2000:] if log is not None else ""
                raise TimeoutError(f"{' '.join(args)} did not listen on {port}: {detail}"
                                   ) from None
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not None:
            out.close()  # type: ignore[union-attr]
