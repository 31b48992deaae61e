"""The scheduler as a live component: in-process core, HTTP service, remote client."""
