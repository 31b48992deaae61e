"""A real single-member etcd for the discovery tests, on free ports, with its own data directory.

The `etcd` binary comes from the OS (Debian/Ubuntu: `apt-get install -y etcd-server`; CI installs
it). `stop()`/`start()` simulate an outage with the data kept (same ports, same directory).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .harness import free_port, wait_for_port

ETCD_BINARY = shutil.which("etcd")
MISSING_REASON = "the etcd binary is not installed (apt-get install -y etcd-server)"


class EtcdServer:
    """`etcd` on 127.0.0.1: `endpoint` is `host:port` for clients, `url` its base URL."""

    def __init__(self, data_dir: Path) -> None:
        if ETCD_BINARY is None:
            raise RuntimeError(MISSING_REASON)
        self.data_dir = data_dir
        self.client_port, self.peer_port = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self.url = f"http://{self.endpoint}"
        self._log = data_dir.with_suffix(".log")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [ETCD_BINARY or "etcd", "--name", "default", "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}"]
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.client_port)
            self.call("/v3/kv/range", {"key": "AA=="})  # answers only once it has a leader
        except Exception:
            self.stop()
            raise RuntimeError(f"etcd did not start: {self._log.read_text()[-2000:]}") from None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None

    def call(self, path: str, body: dict[str, object], token: str = "") -> dict[str, object]:
        """One JSON-gateway call, independent of the code under test (urllib, blocking)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Authorization": token} if token else {})
        for _ in range(50):
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    return dict(json.loads(resp.read()))
            except urllib.error.HTTPError as exc:
                if exc.code != 503:  # 503: no leader elected yet
                    raise
            time.sleep(0.1)
        raise TimeoutError(f"etcd {self.url}{path} kept answering 503")


@contextmanager
def etcd_server(data_dir: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
