"""`python -m prescient.simengine [flags]`: `prescient sim-engine` on its own."""

import sys

from prescient.cli import main

sys.exit(main(["sim-engine", *sys.argv[1:]]))
