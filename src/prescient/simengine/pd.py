"""vLLM's P/D disaggregation convention (`kv_transfer_params`), as the simulated engine plays it.

A P/D gateway (reference §8.3) sends a request twice. First to a prefill instance with
`max_tokens=1` and `kv_transfer_params.do_remote_decode=true`: that instance runs the prefill
and answers with the parameters a decode instance needs to pull the KV (vLLM's NIXL connector
shape: `do_remote_prefill`, `remote_engine_id`, `remote_block_ids`, `remote_host`,
`remote_port`). Then to a decode instance with those parameters: it skips the prompt's
prefill, waits for the KV to arrive, and decodes.

The simulation moves no bytes: the transfer takes the prompt's KV size over a configured link
bandwidth (`transfer_time_s`), after which the request joins the engine with its prompt's KV
present (`SimEngine.add_request(..., prefilled=True)`).
"""

from __future__ import annotations

from typing import Any

import msgspec


class KvTransferParams(msgspec.Struct, kw_only=True):
    """The fields of vLLM's `kv_transfer_params` the simulation acts on; others are ignored."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_block_ids: list[int] | None = None
    remote_host: str | None = None
    remote_port: int | None = None


class _Envelope(msgspec.Struct, kw_only=True):
    kv_transfer_params: KvTransferParams | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)


def read_kv_transfer(body: bytes) -> KvTransferParams | None:
    """The request's `kv_transfer_params`, or None (absent, null, or not an object)."""
    try:
        return _ENVELOPE.decode(body).kv_transfer_params
    except msgspec.DecodeError:  # includes ValidationError: the body was validated already
        return None


def prefill_answer(instance_id: str, host: str, port: int, prompt_len: int,
                   block_size: int) -> dict[str, Any]:
    """What a prefill instance returns for the decode instance: where to pull the KV from."""
    return {"do_remote_prefill": True, "do_remote_decode": False,
            "remote_engine_id": instance_id,
            "remote_block_ids": list(range(-(-prompt_len // block_size))),
            "remote_host": host, "remote_port": port}


def with_kv_transfer(body: bytes, params: dict[str, Any]) -> bytes:
    """A JSON object `body` with a `kv_transfer_params` member added."""
    assert body.endswith(b"}")
    return body[:-1] + b',"kv_transfer_params":' + msgspec.json.encode(params) + b"}"


def transfer_time_s(prompt_tokens: int, kv_bytes_per_token: int, bandwidth_gb_s: float) -> float:
    """Seconds to move a prompt's KV from the prefill instance (engine time)."""
    return prompt_tokens * kv_bytes_per_token / (bandwidth_gb_s * 1e9)
