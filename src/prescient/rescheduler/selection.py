"""Which requests a migration moves: upstream's engine-side selection (reference §7.3).

The source engine is told a rule, an order and a value; it walks its requests in that order and
greedily takes them until the budget is spent.

- Budget: `NUM_REQ` counts requests (`value`; -1 means all of them, the pre-stop drain), `TOKEN`
  counts tokens (`value`), `RATIO` counts `int(KV capacity in tokens * value)` tokens.
- Cost of one request: 1 under `NUM_REQ`; its sequence length (prompt + output tokens) otherwise.
- Orders: `LCR` running requests last come first; `FCR` first come first; `SR` shortest sequence
  first; `LR` longest first; `FCW` the waiting queue first come first; `FCWSR` FCW, then SR over
  the running requests with what is left of the budget. Ties keep arrival order.
- Greedy fill: stop once the budget is reached; skip requests already migrating and running
  requests not yet past their prefill (upstream: no output token yet; here also a preempted
  request recomputing its KV, which has nothing stable to copy); skip (and go on past) a request
  whose own cost exceeds the whole budget.

Slots: each instance migrates at most `LLUMNIX_MAX_REQ_MIG_OUT` requests out and
`LLUMNIX_MAX_REQ_MIG_IN` in at a time (both 1 upstream). Like the llumlet's pre-check, a
`NUM_REQ` command asking for more requests than the source has free out-slots is refused
outright, and any command is refused when no out-slot is free; the selection itself then takes at
most as many requests as both sides have free slots. A drain ignores the slots: it must move
everything, and the slots exist to pace load balancing, not an instance's shutdown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from prescient.rescheduler.plan import DRAIN, SelectOrder, SelectRule

DEFAULT_MAX_REQ_MIG = 1  # LLUMNIX_MAX_REQ_MIG_IN / LLUMNIX_MAX_REQ_MIG_OUT


class Candidate(NamedTuple):
    """One request of the source engine as the selection sees it."""

    request_id: str
    seq_len: int  # prompt + output tokens
    waiting: bool  # in the waiting queue (holds no KV)
    decoding: bool  # running and past its prefill
    migrating: bool  # already chosen by an earlier migration


def budget(rule: SelectRule, value: float, num_gpu_tokens: int) -> float:
    """What the selection may spend: requests or tokens (inf for a drain)."""
    if rule == "NUM_REQ":
        return math.inf if value == DRAIN else value
    if rule == "TOKEN":
        return value
    return int(num_gpu_tokens * value)


def refuse(rule: SelectRule, value: float, free_out_slots: int) -> str:
    """Why the source refuses the command outright ("" if it does not): the slot pre-check."""
    if rule == "NUM_REQ" and value == DRAIN:
        return ""
    if free_out_slots <= 0:
        return "no free migrate-out slot"
    if rule == "NUM_REQ" and value > free_out_slots:
        return f"{value:g} requests asked, {free_out_slots} migrate-out slots free"
    return ""


def ordered(candidates: Sequence[Candidate], order: SelectOrder) -> list[Candidate]:
    """`candidates` (given in arrival order) in the order the selection considers them."""
    running = [c for c in candidates if not c.waiting]
    waiting = [c for c in candidates if c.waiting]
    if order == "LCR":
        return running[::-1]
    if order == "FCR":
        return running
    if order == "SR":
        return sorted(running, key=lambda c: c.seq_len)
    if order == "LR":
        return sorted(running, key=lambda c: -c.seq_len)
    if order == "FCW":
        return waiting
    return waiting + sorted(running, key=lambda c: c.seq_len)  # FCWSR


def select(
    candidates: Sequence[Candidate], rule: SelectRule, order: SelectOrder, value: float, *,
    num_gpu_tokens: int, max_requests: float = math.inf,
) -> list[str]:
    """The ids to migrate, in the order chosen.

    Args:
        candidates: the source's requests in arrival order.
        rule, order, value: the command (`value` -1 with `NUM_REQ` drains).
        num_gpu_tokens: the source's KV capacity in tokens (for `RATIO`).
        max_requests: free slots; ignored by a drain.
    """
    limit = budget(rule, value, num_gpu_tokens)
    if rule == "NUM_REQ" and value == DRAIN:
        max_requests = math.inf
    chosen: list[str] = []
    spent = 0.0
    for c in ordered(candidates, order):
        if spent >= limit or len(chosen) >= max_requests:
            break
        if c.migrating or not (c.waiting or c.decoding):
            continue
        cost = 1 if rule == "NUM_REQ" else c.seq_len
        if cost > limit:
            continue
        chosen.append(c.request_id)
        spent += cost
    return chosen
