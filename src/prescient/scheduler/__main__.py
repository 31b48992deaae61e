"""`python -m prescient.scheduler [flags]`: the scheduler service without the umbrella CLI."""

import sys

from prescient.scheduler.cli import main

sys.exit(main())
