"""Pinned child processes and what they cost, for the gateway-overhead benchmark.

The measurement keeps the two cores apart: the proxy alone on core 1, everything else (fake
backends, Redis, the CMS feeder, wrk or the open-loop generator) on core 0. So every child is
started through `taskset -c <core>` (which execs the program, so the pid is the program's) and
its CPU is read from `/proc/<pid>/stat` (utime + stime, summed over the process tree) around
each run. Core busy shares come from `/proc/stat`. Linux only.
"""

from __future__ import annotations

import http.client
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shell_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """A command as one could paste it into a shell, with its extra environment first."""
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + shlex.join(argv)


@dataclass
class Child:
    """A started, pinned child; `log` holds its stdout and stderr."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Children:
    """Every child this benchmark started, so that each is stopped by its own pid."""

    log_dir: Path
    commands: list[str] = field(default_factory=list)
    _live: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], *, core: int,
              env: Mapping[str, str] | None = None) -> Child:
        pinned = ["taskset", "-c", str(core), *argv]
        extra = dict(env or {})
        line = shell_line(pinned, extra)
        self.commands.append(f"[{name}] {line}")
        log = self.log_dir / f"{name}.log"
        out = open(log, "ab")  # noqa: SIM115 (the child owns it; closed when the child stops)
        proc = subprocess.Popen(pinned, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **extra})
        out.close()
        child = Child(name, list(pinned), extra, log, proc)
        self._live.append(child)
        return child

    def stop(self, child: Child) -> None:
        if child.proc.poll() is None:
            child.proc.terminate()
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        if child in self._live:
            self._live.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self._live)):
            self.stop(child)


def wait_for_port(port: int, child: Child | None = None, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n"
                               f"{child.tail()}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:g} s")


def post(port: int, path: str, body: bytes, timeout_s: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_until_serving(port: int, path: str, bodies: Sequence[bytes], child: Child | None,
                       timeout_s: float) -> None:
    """Until every body gets a 200 (a stream: ending in `data: [DONE]`), or raise with the
    last answer: a router may listen before it has found healthy workers."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if child is not None and child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n"
                               f"{child.tail()}")
        try:
            answers = [post(port, path, body) for body in bodies]
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        else:
            bad = [(s, b[:300]) for s, b in answers if s != 200]
            streams = [b for body, (_, b) in zip(bodies, answers, strict=True)
                       if b'"stream":true' in body and not b.endswith(b"data: [DONE]\n\n")]
            if not bad and not streams:
                return
            last = (f"status/body {bad[0]}" if bad
                    else f"stream without [DONE]: {streams[0][-200:]!r}")
        time.sleep(0.2)
    raise TimeoutError(f"127.0.0.1:{port}{path} not serving after {timeout_s:g} s: {last}")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, found through each process's ppid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (f := _stat_fields(int(entry))) is not None:
            children.setdefault(int(f[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process tree, seconds (a thread's time counts in its process)."""
    ticks = 0
    for p in process_tree(pid):
        f = _stat_fields(p)
        if f is not None:
            ticks += int(f[11]) + int(f[12])  # fields 14 and 15 of proc(5)
    return ticks / CLK_TCK


def core_times() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat (idle and iowait count as not busy)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            v = [int(x) for x in vals]
            total = sum(v[:8])
            out[int(name[3:])] = (total - v[3] - v[4], total)
    return out


def busy_shares(before: dict[int, tuple[int, int]],
                after: dict[int, tuple[int, int]]) -> dict[int, float]:
    return {c: (after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1])
            for c in after if c in before}


def threads_and_rss_mb(pid: int) -> tuple[int, float]:
    """Threads and resident memory of the process tree."""
    threads, rss_kb = 0, 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    threads += int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss_kb += int(line.split()[1])
        except OSError:
            continue
    return threads, rss_kb / 1024
