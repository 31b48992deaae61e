"""The scheduling core and the engine core do no I/O and never read the wall clock."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import prescient

CORE_PACKAGES = ("model", "engine", "policy", "predict", "rescheduler")
# cms is only partly core: the view and the record codec are pure; the store, the Redis store
# and the reader do I/O. The generated protobuf module (cms/proto) is not ours to scan.
CORE_MODULES = ("cms", "cms.view", "cms.codec")
CORE_MODULE_FILES = ("cms/__init__.py", "cms/view.py", "cms/codec.py")
FORBIDDEN_MODULES = ("asyncio", "socket", "ssl", "selectors", "redis", "http", "urllib.request",
                     "aiohttp", "httpx", "grpc", "subprocess")
FORBIDDEN_CALLS = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter"),
                   ("datetime", "now"), ("datetime", "utcnow"), ("os", "getenv"),
                   ("os", "environ"), ("random", "random"), ("random", "seed")}
ROOT = Path(prescient.__file__).parent


def core_files() -> list[Path]:
    packages = [p for pkg in CORE_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return packages + [ROOT / name for name in CORE_MODULE_FILES]


def test_importing_the_core_loads_no_io_module() -> None:
    code = (
        "import sys\n"
        + "".join(f"import prescient.{name}\n" for name in CORE_PACKAGES + CORE_MODULES)
        + "import prescient.config.presets\n"
        + f"print([m for m in {FORBIDDEN_MODULES!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_core_source_names_no_io_module_clock_or_environment() -> None:
    assert len(core_files()) >= 10
    for path in core_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                for name in names:
                    assert not name.startswith(FORBIDDEN_MODULES), f"{path}: imports {name}"
                    assert name not in ("os", "time", "datetime"), f"{path}: imports {name}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in FORBIDDEN_CALLS, (
                    f"{path}:{node.lineno}: {node.value.id}.{node.attr}")


def test_every_area_exports_a_sorted_complete_all() -> None:
    import importlib

    for area in ("config", "model", "engine", "policy", "sim", "cms", "llumlet"):
        module = importlib.import_module(f"prescient.{area}")
        exported = module.__all__
        # isort-style, as ruff keeps it: CONSTANTS, then Classes, then functions
        key = lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n)  # noqa: E731
        assert list(exported) == sorted(exported, key=key), area
        for name in exported:
            assert hasattr(module, name), f"prescient.{area}.{name}"
