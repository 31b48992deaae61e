"""`python -m prescient`."""

import sys

from prescient.cli import main

sys.exit(main())
