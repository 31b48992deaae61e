"""Request parsing, forwarded headers and metrics rendering."""

from __future__ import annotations

import json

import pytest

from prescient.gateway.metrics import GatewayMetrics, Histogram
from prescient.gateway.parse import parse_request
from prescient.gateway.proxy import forward_headers
from prescient.openai_api import ApiError
from prescient.tokenizer import ApproxTokenizer

TOK = ApproxTokenizer()


def test_prompts_of_every_shape_count_their_tokens() -> None:
    text = b'{"model": "m", "prompt": "hello world"}'
    assert parse_request(text, "completion", TOK).prompt_ids == TOK.encode("hello world")
    ids = parse_request(b'{"model": "m", "prompt": [5, 6, 7], "stream": true}', "completion",
                        TOK)
    assert (ids.prompt_ids, ids.stream) == ([5, 6, 7], True)
    batch = parse_request(b'{"model": "m", "prompt": [[1, 2], [3]]}', "completion", TOK)
    assert batch.prompt_ids == [1, 2, 3]
    chat = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
                         "chat", TOK)
    expected = TOK.encode(TOK.apply_chat_template([{"role": "user", "content": "hi"}]),
                          add_special_tokens=False)
    assert chat.prompt_ids == expected and chat.model == "m"


def test_bad_requests_raise_api_errors_with_the_right_status() -> None:
    cases = [
        (b"{", "completion", 400, {}),
        (b'{"model": "m", "prompt": "x", "max_tokens": 0}', "completion", 400, {}),
        (b'{"model": "m", "messages": []}', "chat", 400, {}),
        (b'{"model": "other", "prompt": "x"}', "completion", 404,
         {"served_models": frozenset({"m"})}),
        (b'{"model": "m", "prompt": "a b c d e f"}', "completion", 400, {"max_model_len": 3}),
    ]
    for body, kind, status, kwargs in cases:
        with pytest.raises(ApiError) as err:
            parse_request(body, kind, TOK, **kwargs)  # type: ignore[arg-type]
        assert err.value.status == status, body


def test_forwarded_headers_drop_hop_by_hop_ones_and_force_the_request_id() -> None:
    headers = {"host": "gw", "content-length": "3", "connection": "keep-alive",
               "authorization": "Bearer k", "x-request-id": "client", "accept-encoding": "gzip",
               "content-type": "application/json", "expect": "100-continue"}
    assert forward_headers(headers, "forced") == (
        b"authorization: Bearer k\r\ncontent-type: application/json\r\nx-request-id: forced\r\n")


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert (h.count, h.total) == (4, pytest.approx(2.65))


def test_metrics_render_as_prometheus_text() -> None:
    m = GatewayMetrics()
    m.request_done("chat", 200)
    m.request_done("chat", 200)
    m.error("upstream_connect")
    m.ttft_seconds.observe(0.02)
    text = m.render().decode()
    assert 'prescient_gateway_requests_total{kind="chat",status="200"} 2.0' in text
    assert 'prescient_gateway_errors_total{kind="upstream_connect"} 1.0' in text
    assert 'prescient_gateway_ttft_seconds_bucket{le="0.025"} 1.0' in text


def test_counting_without_ids_gives_the_encoded_length() -> None:
    texts = ["hello world", "Supercalifragilisticexpialidocious, 42 times!\n\n ok",
             " zzzzzzzzzzzzzzzzzzzzzzzzz qq", ""]
    for text in texts:
        assert TOK.count(text) == len(TOK.encode(text)), text
    body = json.dumps({"model": "m", "prompt": [texts[0], texts[2], texts[1]]}).encode()
    with_ids = parse_request(body, "completion", TOK)
    counted = parse_request(body, "completion", TOK, want_ids=False)
    assert counted.prompt_ids is None and with_ids.prompt_ids is not None
    assert counted.num_prompt_tokens == with_ids.num_prompt_tokens == len(with_ids.prompt_ids)
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": texts[1]}]})
    assert (parse_request(chat.encode(), "chat", TOK, want_ids=False).num_prompt_tokens
            == len(parse_request(chat.encode(), "chat", TOK).prompt_ids or []))
