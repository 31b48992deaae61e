"""The `mooncake` backend: ask a global KV store's metadata service who holds a prompt's chunks.

Upstream Llumnix's KVS client (reference §6.2, `pkg/scheduler/kvs/`): the prompt's chunk keys
(`kvs_keys`, `--kvs-chunk-size` tokens each) go to
`GET /batch_query_keys?keys=<url-escaped keys joined by ",">`, which answers
`{"success": bool, "data": {key: {"ok": bool, "values": [{"transport_endpoint_": "ip:port"}]}}}`.
A holder is the endpoint's IP; the scheduler maps it to instances through the CMS metadata's
`ip_kvs` (every DP rank on that IP counts as a hit).

Failure handling as upstream: a query is tried `--kvs-retry-times` times,
`--kvs-retry-interval-ms` apart; when all fail the service is marked **down** for
`--kvs-metadata-service-down-duration-s`, during which queries answer "no hits" at once without
touching the network; the first query after the window tries again (automatic recovery). A
`success: false` answer, a non-200 status, a malformed body, a connection error and a timeout
are all failed attempts. Hits count contiguously from the first chunk (`contiguous_hits`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote_plus

import aiohttp

from prescient.cache.hashing import KvsHashAlgo, kvs_keys
from prescient.cache.index import contiguous_hits
from prescient.model import InstanceMetadata

_log = logging.getLogger(__name__)


class MooncakeQueryError(Exception):
    """One failed attempt at the metadata service (the message says why)."""


class MooncakeClient:
    """`/batch_query_keys` with retries and a down window.

    Args:
        host, port: the metadata service (`--kvs-metadata-service-http-server-host/-port`).
        retry_times: attempts per query before the service is marked down.
        retry_interval_ms: pause between attempts.
        down_duration_s: how long a down service is skipped.
        timeout_s: per-attempt HTTP timeout (upstream: 3 s).
        clock: seconds, monotonic; injectable for tests.
    """

    def __init__(self, host: str, port: int, *, retry_times: int = 5,
                 retry_interval_ms: int = 100, down_duration_s: float = 30.0,
                 timeout_s: float = 3.0,
                 clock: Callable[[], float] = time.monotonic,  # noqa: TID251 (a live edge)
                 ) -> None:
        if retry_times < 1:
            raise ValueError("retry_times must be >= 1")
        self.url = f"http://{host}:{port}/batch_query_keys"
        self.retry_times = retry_times
        self.retry_interval_s = retry_interval_ms / 1000
        self.down_duration_s = down_duration_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._down_since: float | None = None
        self._session: aiohttp.ClientSession | None = None
        self.num_failed_attempts = 0

    @property
    def is_down(self) -> bool:
        """Inside the down window (leaving it clears the mark)."""
        if self._down_since is None:
            return False
        if self._clock() - self._down_since >= self.down_duration_s:
            self._down_since = None
            _log.info("KV-store metadata service: down window over, querying again")
            return False
        return True

    async def batch_query(self, keys: Sequence[str]) -> dict[str, list[str]] | None:
        """Holder IPs per key (keys nobody holds map to []); None while down or after failing."""
        if not keys or self.is_down:
            return None
        last: Exception | None = None
        for attempt in range(self.retry_times):
            if attempt:
                await asyncio.sleep(self.retry_interval_s)
            try:
                return await self._query_once(keys)
            except (MooncakeQueryError, aiohttp.ClientError, TimeoutError) as e:
                self.num_failed_attempts += 1
                last = e
        self._down_since = self._clock()
        _log.warning("KV-store metadata service %s failed %d times (%s); skipping it for %g s",
                     self.url, self.retry_times, last, self.down_duration_s)
        return None

    async def _query_once(self, keys: Sequence[str]) -> dict[str, list[str]]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        query = "keys=" + ",".join(quote_plus(k) for k in keys)
        async with self._session.get(f"{self.url}?{query}",
                                     headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                body = (await resp.text())[:200]
                raise MooncakeQueryError(f"HTTP {resp.status}: {body}")
            try:
                body = await resp.json(content_type=None)
            except ValueError as e:
                raise MooncakeQueryError(f"body is not JSON: {e}") from e
        return parse_response(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def parse_response(body: Any) -> dict[str, list[str]]:
    """Holder IPs per key from a `/batch_query_keys` body; raises `MooncakeQueryError`."""
    if not isinstance(body, dict) or body.get("success") is not True:
        raise MooncakeQueryError("success is not true")
    data = body.get("data") or {}
    if not isinstance(data, dict):
        raise MooncakeQueryError("data is not an object")
    out: dict[str, list[str]] = {}
    for key, item in data.items():
        values = item.get("values") if isinstance(item, dict) else None
        if not isinstance(item, dict) or (item.get("ok") is False) or not values:
            out[key] = []
            continue
        ips = [str(v.get("transport_endpoint_") or "").split(":")[0]
               for v in values if isinstance(v, dict)]
        out[key] = [ip for ip in ips if ip]
    return out


class MooncakeIndex:
    """Prompt tokens -> per-instance prefix hit tokens, through the metadata service.

    Args:
        client: the metadata-service client.
        chunk_size, algo, save_unfull_chunk, seed: the KV store's key rule (`kvs_keys`).
    """

    def __init__(self, client: MooncakeClient, *, chunk_size: int = 256,
                 algo: KvsHashAlgo = "sha256_cbor", save_unfull_chunk: bool = False,
                 seed: str = "0", iris_meta_prefix: str = "iris.",
                 vllm_block_prefix: str = "block.hash.key.") -> None:
        self.client = client
        self.chunk_size = chunk_size
        self._key_args: dict[str, Any] = dict(
            algo=algo, save_unfull_chunk=save_unfull_chunk, seed=seed,
            iris_meta_prefix=iris_meta_prefix, vllm_block_prefix=vllm_block_prefix)

    def keys(self, tokens: Sequence[int]) -> list[str]:
        return kvs_keys(tokens, self.chunk_size, **self._key_args)

    async def hit_lengths(self, keys: Sequence[str]) -> dict[str, int]:
        """Per holder IP, the chunks it holds contiguously from the first; {} when down."""
        holders = await self.client.batch_query(keys)
        if not holders:
            return {}
        bits: dict[str, int] = {}
        masks = []
        for key in keys:
            mask = 0
            for ip in holders.get(key, ()):
                mask |= 1 << bits.setdefault(ip, len(bits))
            masks.append(mask)
        return contiguous_hits(masks, list(bits))

    async def instance_hits(self, tokens: Sequence[int],
                            metadata: Mapping[str, InstanceMetadata]) -> dict[str, int]:
        """Per instance id, prompt tokens it can reuse (capped at the prompt length)."""
        by_ip = await self.hit_lengths(self.keys(tokens))
        out: dict[str, int] = {}
        for iid, md in metadata.items():
            chunks = by_ip.get(md.ip_kvs, 0)
            if chunks:
                out[iid] = min(chunks * self.chunk_size, len(tokens))
        return out
