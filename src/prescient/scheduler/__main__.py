"""`python -m prescient.scheduler [flags]`: `prescient scheduler` on its own."""

import sys

from prescient.cli import main

sys.exit(main(["scheduler", *sys.argv[1:]]))
