"""`python -m prescient.simengine [flags]`: `prescient sim-engine` without the main CLI."""

import argparse
import os
import sys

from prescient.errors import PrescientError
from prescient.simengine import cli


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m prescient.simengine", allow_abbrev=False)
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["sim-engine", *sys.argv[1:]])
        return cli.run(args, os.environ)
    except PrescientError as e:
        print(f"prescient: error: {e}", file=sys.stderr)
        return 2


sys.exit(main())
