"""OpenAI-compatible request and response shapes, shared by the gateway and the sim-engine server.

Requests are decoded strictly enough to answer bad input with an OpenAI-style 4xx (`ApiError`)
and loosely enough to pass through fields we do not know (they are ignored here; the gateway
forwards the client's JSON object, not these structs). Responses follow vLLM's output, including
`usage` and the `stream_options.include_usage` final chunk.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from prescient.errors import PrescientError

# One array type only: msgspec allows a single array-like member in a union. A prompt is text,
# token ids, or a batch of either; `decode_request` refuses lists that mix the kinds.
Prompt = str | list[str | int | list[int]]


class ApiError(PrescientError):
    """A request the API refuses; rendered as `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param

    def body(self) -> bytes:
        return error_body(self.status, self.message, type=self.type, param=self.param)


def error_body(status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None) -> bytes:
    """The OpenAI error object: `{"error": {"message", "type", "param", "code"}}`."""
    return msgspec.json.encode(
        {"error": {"message": message, "type": type, "param": param, "code": status}})


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # chat: OpenAI's newer name for max_tokens
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def limit(self) -> int | None:
        """The output-token limit the client asked for, if any."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else (
            self.max_tokens)

    def check(self) -> None:
        limit = self.limit()
        if limit is not None and limit < 1:
            name = "max_completion_tokens" if self.max_completion_tokens is not None else (
                "max_tokens")
            raise ApiError(400, f"{name} must be at least 1, got {limit}", param=name)
        if self.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")


class CompletionRequest(_Sampling, kw_only=True):
    prompt: Prompt


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (content parts of type "text" joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    # vLLM's chat-template parameters: continue the last (assistant) message instead of
    # opening a new turn, as the gateway's stream replay does
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def check(self) -> None:
        super().check()
        if self.continue_final_message and self.add_generation_prompt:
            raise ApiError(400, "continue_final_message and add_generation_prompt cannot both "
                                "be true", param="continue_final_message")


def decode_request(body: bytes, kind: Literal["completion", "chat"]
                   ) -> CompletionRequest | ChatCompletionRequest:
    """Decode and check a request body; bad JSON or fields raise `ApiError(400)`."""
    cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    try:
        request = msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        raise ApiError(400, f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    request.check()
    if isinstance(request, ChatCompletionRequest) and not request.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    if isinstance(request, CompletionRequest) and request.prompt in ("", []):
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if isinstance(request, CompletionRequest) and isinstance(request.prompt, list):
        kinds = {type(p) for p in request.prompt}
        if len(kinds) > 1:
            raise ApiError(400, "prompt must be a string, a list of token ids, or a list of "
                                "strings or of token-id lists, not a mix", param="prompt")
    return request


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: ChatDelta | None = None  # non-stream responses
    delta: ChatDelta | None = None  # stream chunks
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"  # "chat.completion.chunk" when streaming
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
