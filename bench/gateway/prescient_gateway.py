"""Runs `prescient gateway` from `prescient.gateway.cli` while `prescient` does not list it.

Each service ships `add_parser`/`run` in its own `cli.py` and the lead wires them into
`prescient.cli`; until that has happened for the gateway, the benchmark starts it through this
file with the same arguments (`python bench/gateway/prescient_gateway.py gateway --port ...`).
Once `python -m prescient gateway --help` works the benchmark uses that instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from prescient.errors import PrescientError
from prescient.gateway import cli


def main() -> int:
    parser = argparse.ArgumentParser(prog="prescient")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    try:
        return cli.run(args, os.environ)
    except PrescientError as e:
        print(f"prescient: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
