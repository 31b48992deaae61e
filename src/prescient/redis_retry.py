"""What Prescient's Redis clients (the CMS store, discovery) share: upstream's reconnect policy
and the deadline of one whole command.

A command is retried `retry_times` times on a connection error or timeout, `RETRY_BACKOFF_S`
apart (upstream `REDIS_RETRY_TIMES` / `REDIS_RETRY_INTERVAL`). `call_deadline_s` bounds the
whole call, every try's connect and read plus the backoffs: with redis-py 8 the first command
after a Redis restart hung forever twice, so a command that outlives this bound is treated as
failed instead of waited on.
"""

from __future__ import annotations

from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff, NoBackoff

RETRY_BACKOFF_S = 0.1  # upstream REDIS_RETRY_INTERVAL


def retry_policy(retry_times: int) -> Retry:
    """redis-py's `Retry` for `retry_times` reconnect attempts (0: none)."""
    if retry_times > 0:
        return Retry(ConstantBackoff(RETRY_BACKOFF_S), retry_times)
    return Retry(NoBackoff(), 0)


def call_deadline_s(timeout_s: float, retry_times: int) -> float:
    """The longest one command may take with socket timeout `timeout_s` and `retry_times`."""
    return (retry_times + 1) * 2 * timeout_s + retry_times * RETRY_BACKOFF_S
