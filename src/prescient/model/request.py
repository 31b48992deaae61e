"""A request as the scheduler and the simulated engine see it."""

from __future__ import annotations

import msgspec


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """One inference request.

    `prefix_block_ids` describe shared content without token text (the Mooncake trace format):
    id `k` names the tokens `[k * prefix_block_size, (k + 1) * prefix_block_size)` of the
    request's token sequence (prompt, then output). Two requests whose ids agree up to some block
    share that prefix. Positions not covered by ids (or `prompt_token_ids`) are unique to the
    request.
    """

    request_id: str
    prompt_len: int  # tokens
    output_len: int = 1  # tokens to generate (known to the simulator only)
    arrival_time: float = 0.0  # seconds since the start of the workload
    prompt_token_ids: tuple[int, ...] | None = None
    priority: int = 0  # lower is more urgent
    slo_class: str = ""
    session_id: str = ""
    prefix_block_ids: tuple[int, ...] = ()
    prefix_block_size: int = 512  # tokens per prefix block id
    predicted_output_len: int | None = None  # tokens, from an output-length predictor

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"request {self.request_id}: prompt_len must be >= 1")
        if self.output_len < 1:
            raise ValueError(f"request {self.request_id}: output_len must be >= 1")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.prompt_len:
            raise ValueError(f"request {self.request_id}: prompt_token_ids length != prompt_len")
        if self.prefix_block_size < 1:
            raise ValueError(f"request {self.request_id}: prefix_block_size must be >= 1")
