"""The real-vLLM tier: runs only with PRESCIENT_VLLM_TESTS=1 (`make test-vllm`, `.ci/run`).

Two engines, one per core, are started once per session (~30 s) and shared (`vllm_engines`);
a test that needs both running asks for `vllm_pair`, which restarts one an earlier test killed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..harness import free_port
from .engine import VllmEngine, ahead_of_the_engines, vllm_venv

ENABLED = os.environ.get("PRESCIENT_VLLM_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="real-vLLM tier: set PRESCIENT_VLLM_TESTS=1 (make test-vllm)")
    for item in items:
        if "tests/live/vllm/" in str(item.path):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_workdir() -> Iterator[Path]:
    # ipc paths must stay short (108 bytes): a fresh /tmp directory, not pytest's tmp_path
    with tempfile.TemporaryDirectory(prefix="pvllm-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def vllm_env() -> Path:
    """The vLLM CPU venv (built on first use, then cached)."""
    return vllm_venv()


@pytest.fixture(scope="session")
def vllm_engines(vllm_env: Path, vllm_workdir: Path) -> Iterator[list[VllmEngine]]:
    engines = [VllmEngine(vllm_env, free_port(), core, vllm_workdir) for core in (0, 1)]
    try:
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.wait_ready()
        # the test process and the services it starts would otherwise wait up to seconds for
        # the CPU beside two busy engines (bench/vllm_fidelity.py --starvation)
        with ahead_of_the_engines(engines):
            yield engines
    finally:
        for engine in engines:
            engine.stop()


@pytest.fixture
def vllm_pair(vllm_engines: list[VllmEngine]) -> list[VllmEngine]:
    """Both engines, running and ready (one a test killed is restarted first)."""
    dead = [e for e in vllm_engines if not e.running]
    for engine in dead:
        engine.start()
    for engine in dead:
        engine.wait_ready()
    return vllm_engines
