"""`python -m prescient.gateway [flags]`: the gateway without the umbrella CLI."""

import sys

from prescient.gateway.cli import main

sys.exit(main())
