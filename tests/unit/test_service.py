"""A service process freezes the heap it built at startup (in a child process: a test process
must not run `gc.collect`, which would fire other tests' finalizers)."""

from __future__ import annotations

import subprocess
import sys

from prescient import service

CHILD = """
import asyncio, gc
from prescient import service

service.FREEZE_AFTER_S = 0.05

async def main(stop):
    assert gc.get_freeze_count() == 0 and gc.get_threshold()[0] == 700
    for _ in range(200):
        await asyncio.sleep(0.01)
        if gc.get_freeze_count():
            print("frozen", gc.get_freeze_count(), gc.get_threshold()[0])
            return
    print("not frozen")

service.run_until_signalled(main)
"""


def test_a_service_freezes_its_startup_heap_after_the_delay() -> None:
    """...and collects its youngest generation less often from then on."""
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    word, *count = out.split()
    assert word == "frozen" and int(count[0]) > 1000, out
    assert int(count[1]) == service.GC_GEN0_THRESHOLD > 700

