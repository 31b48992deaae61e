"""Log a backend outage once when it starts and once when it ends, not on every retry.

Resolvers poll or re-watch every second or so; a Redis or etcd that is down would otherwise
write a warning per attempt. While down they keep serving the last known instance set.
"""

from __future__ import annotations

import logging


class OutageLog:
    """Tracks whether `what` is reachable; logs only the transitions."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self._what = what  # e.g. "discovery Redis 127.0.0.1:6379"
        self._log = logger
        self.down = False

    def failed(self, error: BaseException, consequence: str) -> None:
        """An attempt failed; the first failure of an outage is logged with `consequence`."""
        if not self.down:
            self.down = True
            self._log.warning("%s unreachable (%s); %s", self._what, error or type(error).__name__,
                              consequence)

    def ok(self) -> None:
        """An attempt succeeded; the end of an outage is logged."""
        if self.down:
            self.down = False
            self._log.info("%s reachable again", self._what)
