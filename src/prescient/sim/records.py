"""What the simulator records about each request and each instance, as plain data."""

from __future__ import annotations

import msgspec


class RequestRecord(msgspec.Struct, kw_only=True):
    """The life of one request in a simulation. Times are seconds on the simulated clock."""

    request_id: str
    arrival_time: float
    prompt_len: int  # tokens
    output_len: int  # tokens
    instance_id: str = ""  # where it was dispatched; "" if it never was
    first_scheduled_time: float | None = None  # its first prefill chunk started
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    rejected: str = ""  # why the request was refused ("" if it was not)

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, seconds (None for one-token outputs)."""
        if self.finish_time is None or self.first_token_time is None or self.output_len < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.output_len - 1)

    @property
    def e2e(self) -> float | None:
        """End-to-end latency, seconds."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def queueing_delay(self) -> float | None:
        """Arrival to first scheduled prefill chunk, seconds."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


class LoadSample(msgspec.Struct, frozen=True, array_like=True):
    """One instance's true load at one moment, for the load-over-time plot."""

    time: float  # seconds
    instance_id: str
    num_running: int
    num_waiting: int
    kv_usage: float  # used / total KV blocks
