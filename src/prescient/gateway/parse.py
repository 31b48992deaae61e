"""From a client's OpenAI request body to what the scheduler needs: model, stream, prompt tokens.

The body is validated here (bad JSON or fields answer 400 before any scheduling) but never
rewritten: the gateway forwards the client's bytes unchanged (P/D disaggregation alone adds
`kv_transfer_params` to its two legs, gateway/pd.py). Upstream Llumnix turns every
request into a token-id `/v1/completions` call with `stream=true`; we keep the client's own
route and body, which works for any OpenAI-compatible engine and keeps the response format the
engine's. Tokenizing is for scheduling only: the prompt length (every load metric) and the token
ids (cache-aware scheduling, `--forward-tokens`). Without `want_ids` only the length is
computed, which the approximate tokenizer does without building ids.
"""

from __future__ import annotations

from typing import Literal

from prescient.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    decode_request,
)
from prescient.tokenizer import Tokenizer

Kind = Literal["completion", "chat"]


class ParsedRequest:
    """The fields of a client request the gateway acts on."""

    __slots__ = ("model", "num_prompt_tokens", "prompt_ids", "stream")

    def __init__(self, model: str, stream: bool, num_prompt_tokens: int,
                 prompt_ids: list[int] | None) -> None:
        self.model = model
        self.stream = stream
        self.num_prompt_tokens = num_prompt_tokens  # all prompts together
        self.prompt_ids = prompt_ids  # all prompts' token ids, concatenated; None: not wanted


def parse_request(body: bytes, kind: Kind, tokenizer: Tokenizer, *,
                  served_models: frozenset[str] = frozenset(),
                  max_model_len: int = 0, want_ids: bool = True) -> ParsedRequest:
    """Validate `body` and tokenize its prompt (only count its tokens without `want_ids`).

    Raises:
        ApiError: 400 (bad JSON, fields, too long a prompt), 404 (a model not served).
    """
    request = decode_request(body, kind)
    if served_models and request.model not in served_models:
        raise ApiError(404, f"The model `{request.model}` does not exist.",
                       type="NotFoundError", param="model")
    if isinstance(request, ChatCompletionRequest):
        ids = _chat_ids(request, tokenizer, want_ids)
    else:
        ids = _prompt_ids(request, tokenizer, want_ids)
    n = ids if isinstance(ids, int) else len(ids)
    if max_model_len and n >= max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. "
                            f"However, your request has {n} input tokens.",
                       param="messages" if kind == "chat" else "prompt")
    return ParsedRequest(request.model, request.stream, n, None if isinstance(ids, int) else ids)


def _prompt_ids(request: CompletionRequest, tokenizer: Tokenizer,
                want_ids: bool) -> list[int] | int:
    """One prompt or a batch: text, texts, token ids, or lists of token ids (their count
    without `want_ids`)."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return tokenizer.encode(prompt) if want_ids else tokenizer.count(prompt)
    if not want_ids:
        return sum(1 if isinstance(p, int) else tokenizer.count(p) if isinstance(p, str)
                   else len(p) for p in prompt)
    ids: list[int] = []
    for p in prompt:
        if isinstance(p, int):
            ids.append(p)
        else:
            ids.extend(tokenizer.encode(p) if isinstance(p, str) else p)
    return ids


def _chat_ids(request: ChatCompletionRequest, tokenizer: Tokenizer,
              want_ids: bool) -> list[int] | int:
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    try:
        text = tokenizer.apply_chat_template(messages)
    except Exception as e:  # a template may reject a conversation (roles out of order)
        raise ApiError(400, f"the chat template refused these messages: {e}",
                       param="messages") from None
    if want_ids:
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.count(text, add_special_tokens=False)
