"""`python -m prescient.discovery [flags]`: `prescient discovery-agent` on its own."""

import sys

from prescient.cli import main

sys.exit(main(["discovery-agent", *sys.argv[1:]]))
