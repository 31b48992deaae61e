"""A request inside one simulated engine, with its decode progress kept relative to an anchor."""

from __future__ import annotations

from prescient.model import Request


class EngineRequest:
    """A request inside one engine. Decode progress is kept relative to an anchor step."""

    __slots__ = ("a", "arrival_time", "coverage_blocks", "epoch", "finish_step", "finish_time",
                 "first_scheduled_time", "first_token_time", "g0", "hashes", "num_blocks",
                 "num_cached_tokens", "num_computed", "num_output", "num_preemptions", "owned",
                 "request", "request_id")

    def __init__(self, request: Request, now: float, coverage_blocks: int) -> None:
        self.request = request
        self.request_id = request.request_id
        self.arrival_time = now  # seconds, when the engine received it
        self.num_output = 0  # tokens sampled (as of the anchor while decoding)
        self.num_computed = 0  # tokens with KV (as of the anchor while decoding)
        self.num_blocks = 0  # blocks held (as of the anchor while decoding)
        self.coverage_blocks = coverage_blocks  # leading blocks whose content can be shared
        self.hashes: list[int] = []  # chain hashes of the shareable blocks, computed lazily
        self.owned: list[int | None] = []  # per full shareable block: cached hash or None
        self.g0 = -1  # anchor step while decoding, else -1
        self.a = 0  # KV slots needed at step s are a + s while decoding
        self.finish_step = 0  # engine step count at which it has all its tokens
        self.epoch = 0  # invalidates stale finish-heap entries
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prefix-cache hit at first admission, tokens

    @property
    def num_tokens(self) -> int:
        """Prompt plus sampled tokens (as of the anchor while decoding)."""
        return self.request.prompt_len + self.num_output

    def __repr__(self) -> str:
        return f"EngineRequest({self.request_id!r}, out={self.num_output})"
