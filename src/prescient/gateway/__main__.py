"""`python -m prescient.gateway [flags]`: `prescient gateway` on its own."""

import sys

from prescient.cli import main

sys.exit(main(["gateway", *sys.argv[1:]]))
