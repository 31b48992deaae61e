"""Replay state of a stream: whole events out, the continuation's body, its events rewritten."""

from __future__ import annotations

import json
from typing import Any

from prescient.gateway.replay import Replay
from prescient.tokenizer import ApproxTokenizer, fallback_chat_prompt

TOK = ApproxTokenizer()


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def completion(text: str, usage: dict[str, int] | None = None, *, id: str = "cmpl-a",
               created: int = 7, finish: str | None = None) -> bytes:
    return event({"id": id, "created": created, "object": "text_completion", "model": "m",
                  "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                  "usage": usage})


def replay(kind: str, body: dict[str, Any]) -> Replay:
    r = Replay.of(kind, json.dumps(body).encode(), TOK)  # type: ignore[arg-type]
    assert r is not None
    return r


def test_only_whole_events_go_out() -> None:
    r = replay("completion", {"model": "m", "prompt": "hi", "max_tokens": 10, "stream": True})
    one, two = completion(" the"), completion(" of")
    assert r.feed(one + two[:9]) == one
    assert r.feed(two[9:]) == two
    assert r.tokens_sent() == 2  # no usage in the chunks: the text re-tokenized


def test_completion_continuation_extends_the_prompt_and_cuts_the_limit() -> None:
    r = replay("completion", {"model": "m", "prompt": "hi", "max_tokens": 10, "stream": True,
                              "stream_options": {"include_usage": True}})
    r.feed(completion(" the") + completion(" of and"))
    body = json.loads(r.continuation() or b"")
    assert body["prompt"] == "hi the of and" and body["max_tokens"] == 7
    assert body["stream_options"] == {"include_usage": True}
    # the continuation's events take the first attempt's id/created; usage covers the whole
    out = r.feed(completion(" to", id="cmpl-b", created=9)
                 + completion("", {"prompt_tokens": 4, "completion_tokens": 7,
                                   "total_tokens": 11}, id="cmpl-b", created=9)
                 + b"data: [DONE]\n\n")
    events = [json.loads(e[6:]) for e in out.split(b"\n\n")[:-2]]
    assert {(e["id"], e["created"]) for e in events} == {("cmpl-a", 7)}
    assert events[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 10,
                                   "total_tokens": 11}
    assert out.endswith(b"data: [DONE]\n\n") and r.done


def test_engine_usage_counts_tokens_when_present() -> None:
    r = replay("completion", {"model": "m", "prompt": "hi", "max_tokens": 10})
    r.feed(completion(" the of", {"prompt_tokens": 1, "completion_tokens": 3,
                                  "total_tokens": 4}))
    assert r.tokens_sent() == 3


def test_chat_continues_the_assistant_message_and_drops_the_role_delta() -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = replay("chat", {"model": "m", "messages": messages, "max_completion_tokens": 5})
    first = event({"id": "chatcmpl-a", "created": 3, "model": "m", "object": "x",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    r.feed(first + event({"id": "chatcmpl-a", "created": 3, "choices": [
        {"index": 0, "delta": {"content": " the"}}]}))
    body = json.loads(r.continuation() or b"")
    assert body["messages"] == [*messages, {"role": "assistant", "content": " the"}]
    assert body["continue_final_message"] and not body["add_generation_prompt"]
    assert body["max_completion_tokens"] == 4
    assert r.feed(first.replace(b"chatcmpl-a", b"chatcmpl-b")) == b""
    # the continued prompt is exactly the original prompt plus the text so far
    assert fallback_chat_prompt(body["messages"], add_generation_prompt=False,
                                continue_final_message=True) == (
        fallback_chat_prompt(messages) + " the")


def test_token_prompts_and_batches_are_not_replayed() -> None:
    for prompt in ([1, 2, 3], ["a", "b"]):
        assert Replay.of("completion", json.dumps({"model": "m", "prompt": prompt}).encode(),
                         TOK) is None


def test_nothing_left_to_generate_is_not_resumed() -> None:
    r = replay("completion", {"model": "m", "prompt": "hi", "max_tokens": 2})
    r.feed(completion(" the of"))
    assert r.continuation() is None


def test_a_long_stream_is_read_in_bounded_batches_and_resumes_with_all_its_text() -> None:
    """Events are read only when asked or past RAW_LIMIT bytes: the unread part stays bounded
    and nothing is lost to the laziness."""
    from prescient.gateway.replay import RAW_LIMIT

    r = replay("completion", {"model": "m", "prompt": "hi", "max_tokens": 50000, "stream": True})
    words = [f" w{i}" for i in range(3000)]
    for w in words:
        r.feed(completion(w))
        assert r._unread_bytes <= RAW_LIMIT
    assert not r.finished and not r.done
    r.feed(completion("", finish="length") + b"data: [DONE]\n\n")
    assert r.finished and r.done
    fresh = replay("completion", {"model": "m", "prompt": "hi", "max_tokens": 50000,
                                  "stream": True})
    for w in words:
        fresh.feed(completion(w))
    resumed = json.loads(fresh.continuation() or b"null")
    assert resumed["prompt"] == "hi" + "".join(words)
