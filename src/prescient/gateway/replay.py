"""Token replay: a stream whose instance died mid-answer goes on elsewhere, as one stream.

The gateway owns every stream it forwards, so when the upstream connection breaks after the
client got part of an answer, it can ask another instance for the rest: the same request, its
prompt extended by the text generated so far and its token limit reduced by the tokens already
sent. Engines that cannot move KV (stock vLLM, SGLang) recompute that prefix, or hit it in
their prefix cache. The continuation is:

- `/v1/completions` with a text prompt: `prompt + text`, `max_tokens - n`;
- `/v1/chat/completions`: the messages plus `{"role": "assistant", "content": text}` with
  vLLM's `continue_final_message: true, add_generation_prompt: false` (or the text appended to
  the last message when the client already continued one), `max_tokens - n`.

Token-id prompts and prompt batches are not replayed: the generated text's ids are known only
approximately (re-tokenized text may differ from the sampled ids), and a batch's streams
interleave; they end with the error event as before.

`n`, the tokens already sent, is the engine's own count when its chunks carry `usage`
(`stream_options.continuous_usage_stats`); otherwise the text so far re-tokenized by the
gateway's tokenizer, exact when that is the engine's tokenizer and the text round-trips (the
simulated engine's output does; a BPE merge across a chunk edge may not). Without a token
limit the continuation has none either: the engine's default applies to it again.

The client sees one stream: events go out only whole (a partial event at the break is
dropped with the connection), and the continuation's events are rewritten to the first
attempt's `id` and `created`, its `usage` to the original prompt and all completion tokens,
and its role-only first chat delta is dropped.

A first attempt's events are kept as they went out and read only when something asks (a break,
a continuation) or when `RAW_LIMIT` bytes wait: most streams end normally, and reading every
event as it passed cost more CPU than forwarding it.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from prescient.tokenizer import Tokenizer

DONE = b"data: [DONE]"
RAW_LIMIT = 64 * 1024  # bytes of a first attempt's events kept unread (per stream)


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None  # completions
    delta: _Delta | None = None  # chat chunks
    finish_reason: str | None = None


class _Event(msgspec.Struct):
    """The fields of a streamed chunk that replay needs (the rest passes through)."""

    id: str = ""
    created: int = 0
    choices: list[_Choice] = []
    usage: _Usage | None = None


_decode_event = msgspec.json.Decoder(_Event).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class Replay:
    """One streamed request's progress, and the body that resumes it.

    Feed it every chunk of the answer (`feed`, which returns the whole events to send on); when
    the upstream breaks, `continuation()` is the next attempt's body.
    """

    def __init__(self, kind: Literal["completion", "chat"], body: dict[str, Any],
                 tokenizer: Tokenizer) -> None:
        self.kind = kind
        self._body = body
        self._tokenizer = tokenizer
        self._done = False  # the upstream's `[DONE]` went out
        self._finished = False  # a finish_reason went out: generation is over
        self.resumed = False  # a continuation is being streamed
        self._pending = b""  # an event not yet whole
        self._unread: list[bytes] = []  # whole events sent and not yet read (`_read_sent`)
        self._unread_bytes = 0
        self._id = ""
        self._created = 0
        self._texts: list[str] = []  # all text sent, every attempt
        self._attempt_text: list[str] = []  # this attempt's
        self._attempt_tokens: int | None = None  # this attempt's, by the engine's usage
        self._base_tokens = 0  # tokens sent by the previous attempts
        self._prompt_tokens: int | None = None  # the original prompt's, when an engine said

    @classmethod
    def of(cls, kind: Literal["completion", "chat"], raw: bytes,
           tokenizer: Tokenizer) -> Replay | None:
        """The replay state for request body `raw`, or None when it cannot be resumed."""
        try:
            body = _decode_any(raw)
        except msgspec.DecodeError:
            return None
        if not isinstance(body, dict) or body.get("n", 1) != 1:
            return None
        if kind == "completion" and not isinstance(body.get("prompt"), str):
            return None
        if kind == "chat" and not isinstance(body.get("messages"), list):
            return None
        return cls(kind, body, tokenizer)

    # ---- the stream --------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """The upstream's `[DONE]` went out."""
        self._read_sent()
        return self._done

    @property
    def finished(self) -> bool:
        """A finish_reason went out: generation is over."""
        self._read_sent()
        return self._finished

    def feed(self, chunk: bytes) -> bytes:
        """The whole events in `chunk` (with what was pending), to send to the client:
        unchanged on the first attempt, rewritten on a continuation."""
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        self._pending = data[end + 2:]
        whole = data[:end + 2]
        if not self.resumed:
            self._unread.append(whole)
            self._unread_bytes += len(whole)
            if self._unread_bytes > RAW_LIMIT:
                self._read_sent()
            return whole
        out = [self._rewrite(event) for event in whole.split(b"\n\n")[:-1]]
        return b"".join(e + b"\n\n" for e in out if e)

    def _read_sent(self) -> None:
        """Take in the events sent since the last read."""
        if self._unread:
            data = b"".join(self._unread)
            self._unread, self._unread_bytes = [], 0
            for event in data.split(b"\n\n")[:-1]:
                self._track(event)

    def _track(self, event: bytes) -> _Event | None:
        payload = _payload(event)
        if payload is None:
            return None
        if payload == b"[DONE]":
            self._done = True
            return None
        try:
            parsed = _decode_event(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # an error event or something unknown: nothing to count
        if not self._id:
            self._id, self._created = parsed.id, parsed.created
        for choice in parsed.choices:
            text = choice.delta.content if choice.delta is not None else choice.text
            if text:
                self._texts.append(text)
                self._attempt_text.append(text)
            if choice.finish_reason is not None:
                self._finished = True
        if parsed.usage is not None:
            self._attempt_tokens = parsed.usage.completion_tokens
            if not self.resumed and self._prompt_tokens is None:
                self._prompt_tokens = parsed.usage.prompt_tokens
        return parsed

    def _rewrite(self, event: bytes) -> bytes:
        """A continuation's event as part of the first attempt's stream (b"": dropped)."""
        parsed = self._track(event)
        payload = _payload(event)
        if parsed is None or payload is None:
            return event  # `[DONE]`, an error event: as they are
        obj = _decode_any(payload)
        choices = obj.get("choices") or []
        if self.kind == "chat" and len(choices) == 1 and _role_only(choices[0]):
            return b""  # the continuation's opening delta: the client had one
        obj["id"], obj["created"] = self._id or obj.get("id"), self._created or obj.get("created")
        usage = obj.get("usage")
        if isinstance(usage, dict) and parsed.usage is not None:
            completion = self._base_tokens + parsed.usage.completion_tokens
            prompt = (self._prompt_tokens if self._prompt_tokens is not None
                      else parsed.usage.prompt_tokens - self._base_tokens)
            usage.update(prompt_tokens=prompt, completion_tokens=completion,
                         total_tokens=prompt + completion)
        return b"data: " + _encode(obj)

    # ---- the next attempt --------------------------------------------------------------------

    def tokens_sent(self) -> int:
        """Completion tokens the client has received, over every attempt."""
        self._read_sent()
        if self._attempt_tokens is not None:
            return self._base_tokens + self._attempt_tokens
        text = "".join(self._attempt_text)
        if not text:
            return self._base_tokens
        return self._base_tokens + len(self._tokenizer.encode(text, add_special_tokens=False))

    def continuation(self) -> bytes | None:
        """The body that asks for the rest of the answer, and the state set to rewrite its
        events; None when the answer cannot be resumed (the caller ends it with an error)."""
        sent = self.tokens_sent()  # (reads what was sent)
        body = dict(self._body)
        for name in ("max_completion_tokens", "max_tokens"):
            limit = body.get(name)
            if isinstance(limit, int):
                if limit - sent < 1:
                    return None  # nothing left to generate, yet no finish was seen
                body[name] = limit - sent
        text = "".join(self._texts)
        if self.kind == "completion":
            body["prompt"] = self._body["prompt"] + text
        elif not self._continue_chat(body, text):
            return None
        self._base_tokens = sent
        self._attempt_text = []
        self._attempt_tokens = None
        self._pending = b""
        self.resumed = True
        return _encode(body)

    def _continue_chat(self, body: dict[str, Any], text: str) -> bool:
        messages = list(self._body["messages"])
        if self._body.get("continue_final_message"):  # the client continued a message already
            last = messages[-1] if messages else None
            if not isinstance(last, dict) or not isinstance(last.get("content"), str):
                return False
            messages[-1] = {**last, "content": last["content"] + text}
        else:
            messages.append({"role": "assistant", "content": text})
        body.update(messages=messages, continue_final_message=True, add_generation_prompt=False)
        return True


def _role_only(choice: Any) -> bool:
    delta = choice.get("delta") if isinstance(choice, dict) else None
    return (isinstance(delta, dict) and "role" in delta and not delta.get("content")
            and choice.get("finish_reason") is None)


def _payload(event: bytes) -> bytes | None:
    """The `data:` payload of one SSE event (its lines joined), or None if it has none."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
