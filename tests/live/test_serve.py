"""`prescient serve` as a user runs it: a child process answering the official OpenAI client,
spreading concurrent requests over its engines, and exiting 0 on SIGTERM."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from .harness import child, free_port

MODEL = "prescient-sim"
ENGINE_LINE = re.compile(r"engine (sim-\d+) \(.*?\) listening on (http://127\.0\.0\.1:\d+)")


def engine_urls(log: Path, count: int) -> dict[str, str]:
    """The engines' URLs, as the startup log names them."""
    deadline = time.monotonic() + 10
    while True:
        found = dict(ENGINE_LINE.findall(log.read_text()))
        if len(found) == count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def successes(url: str) -> float:
    """An engine's finished requests (vLLM's `vllm:request_success_total`, all reasons)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "vllm:request_success_total")


def test_serve_answers_the_openai_client_spreads_load_and_stops_on_sigterm(
        tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    args = ["serve", "--port", str(port), "--num-engines", "3", "--time-scale", "20"]
    with child(args, port=port, log=log, env={"PYTHONUNBUFFERED": "1"}) as proc:
        engines = engine_urls(log, 3)
        assert sorted(engines) == ["sim-0", "sim-1", "sim-2"]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        try:
            done = client.completions.create(model=MODEL, prompt="hello there", max_tokens=5)
            assert done.choices[0].finish_reason == "length" and done.choices[0].text
            assert done.usage is not None and done.usage.completion_tokens == 5
            assert done.usage.total_tokens == done.usage.prompt_tokens + 5 > 5

            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "tell me a story"}],
                max_tokens=7, stream=True, stream_options={"include_usage": True})
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
            assert text and not chunks[-1].choices  # the usage chunk comes last, alone
            assert usage is not None and usage.completion_tokens == 7
            assert usage.total_tokens == usage.prompt_tokens + 7

            before = {iid: successes(url) for iid, url in engines.items()}
            assert sum(before.values()) == 2  # both requests above, counted by the engines
            prompt = "a fairly long prompt to keep the prefill busy " * 60
            with ThreadPoolExecutor(12) as pool:
                outs = list(pool.map(lambda _: client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=32), range(12)))
            assert all(o.usage is not None and o.usage.completion_tokens == 32 for o in outs)
            served = {iid: successes(url) - before[iid] for iid, url in engines.items()}
            assert sum(served.values()) == 12
            assert sum(1 for n in served.values() if n > 0) > 1, served
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert f"OpenAI API at http://127.0.0.1:{port}/v1" in output and "curl" in output
    assert "Traceback" not in output


def serve_exit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prescient", "serve", *args],
                          capture_output=True, text=True, timeout=60)


def test_bad_flags_and_a_busy_port_exit_2_naming_the_flag() -> None:
    bad = serve_exit("--num-engines", "0")
    assert bad.returncode == 2 and "--num-engines" in bad.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = serve_exit("--port", str(busy.getsockname()[1]), "--num-engines", "1")
    assert taken.returncode == 2 and "--port" in taken.stderr
    assert "Traceback" not in taken.stderr
