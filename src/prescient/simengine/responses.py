"""OpenAI response bodies and SSE chunks as vLLM writes them, and streamed text.

`Reply` renders one request's non-streamed body or its `data: {...}` chunks (completion or
chat flavoured, with `usage`, the `include_usage` final chunk and `continuous_usage_stats`);
`Detokenizer` turns token batches into text pieces that concatenate to the whole decode.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec

from prescient.openai_api import (
    ChatChoice,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
)
from prescient.tokenizer import ApproxTokenizer, HfTokenizer

DETOKENIZE_CONTEXT = 4  # tokens of context when decoding a new batch (see Detokenizer)


class Detokenizer:
    """Text of a growing token sequence, batch by batch, equal to decoding it whole.

    Tokenizers join pieces (spaces between WordLevel tokens, bytes of a BPE merge), so a batch
    decoded alone may lack its joint with the previous one. As vLLM's incremental
    detokenizer, each batch is decoded with the last few tokens before it and only the new
    suffix is kept.
    """

    def __init__(self, tokenizer: ApproxTokenizer | HfTokenizer) -> None:
        self._decode = tokenizer.decode
        self._context: list[int] = []

    def push(self, ids: list[int]) -> str:
        before = self._decode(self._context) if self._context else ""
        after = self._decode(self._context + ids)
        self._context = (self._context + ids)[-DETOKENIZE_CONTEXT:]
        return after[len(before):] if after.startswith(before) else after


class Reply:
    """Renders one request's response body or SSE chunks, completion or chat flavoured."""

    def __init__(self, kind: Literal["completion", "chat"], request_id: str, model: str,
                 prompt_tokens: int) -> None:
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.prompt_tokens + completion_tokens)

    def body(self, text: str, finish_reason: str, completion_tokens: int) -> bytes:
        usage = self.usage(completion_tokens)
        if self.chat:
            message = ChatDelta(role="assistant", content=text)
            return msgspec.json.encode(self._chat([ChatChoice(
                message=message, finish_reason=finish_reason)], usage, "chat.completion"))
        return msgspec.json.encode(self._completion(
            [CompletionChoice(text=text, finish_reason=finish_reason)], usage))

    def chunk(self, text: str | None, finish_reason: str | None = None,
              usage: Usage | None = None, *, role: bool = False) -> bytes:
        if self.chat:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            obj: Any = self._chat([ChatChoice(delta=delta, finish_reason=finish_reason)], usage,
                                  "chat.completion.chunk")
        else:
            obj = self._completion([CompletionChoice(text=text or "",
                                                     finish_reason=finish_reason)], usage)
        return b"data: " + msgspec.json.encode(obj) + b"\n\n"

    def usage_chunk(self, completion_tokens: int) -> bytes:
        usage = self.usage(completion_tokens)
        obj: Any = (self._chat([], usage, "chat.completion.chunk") if self.chat
                    else self._completion([], usage))
        return b"data: " + msgspec.json.encode(obj) + b"\n\n"

    def _chat(self, choices: list[ChatChoice], usage: Usage | None,
              obj: str) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=self.id, object=obj, created=self.created,
                                      model=self.model, choices=choices, usage=usage)

    def _completion(self, choices: list[CompletionChoice],
                    usage: Usage | None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=choices, usage=usage)
