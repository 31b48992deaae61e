"""`python -m prescient.discovery`: the discovery agent on its own (`prescient discovery-agent`)."""

import sys

from prescient.discovery.cli import main

sys.exit(main())
