"""Discovery records <-> protobuf bytes, laid out as upstream Llumnix's `PodDiscoveryInfo`.

A sidecar (ours: `prescient discovery-agent`; or upstream's) writes one record per pod, listing
the pod's healthy instances. Resolvers turn a record back into `DiscoveredInstance`s. This module
is the only place that touches the generated `discovery_pb2`.

Decoding rules, chosen so one bad record never hides the good ones:

- bytes that are not a `PodDiscoveryInfo` raise `DiscoveryCodecError` (the resolver skips that
  key and keeps the rest);
- an empty `pod_name` is filled from the key's suffix when the caller passes it;
- `instance_type` "prefill", "decode", "neutral" map to `InferType`; "" and upstream's older
  "normal" read as neutral; any other type (e.g. "encoder") is an instance this router cannot
  serve, so it is left out of the result and named in `PodRecord.skipped`;
- an instance without an entrypoint address or with a port outside 1-65535 is skipped the same
  way (it could never be reached);
- the instance id is `"<pod_name>_dp<dp_rank>"`, as upstream intends (upstream's Go Redis
  resolver formats the rank with `string(rune)`, a bug; its etcd resolver gets it right).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec
from google.protobuf.message import DecodeError

from prescient.discovery.base import DiscoveredInstance
from prescient.discovery.proto import discovery_pb2
from prescient.errors import PrescientError
from prescient.model import InferType

_INFER_TYPES = {t.value: t for t in InferType} | {"": InferType.NEUTRAL,
                                                   "normal": InferType.NEUTRAL}
RECORD_VERSION = 1  # upstream sidecar's default `--version`; not read back


class DiscoveryCodecError(PrescientError):
    """A discovery record cannot be decoded; the message says why."""


class PodRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One decoded `PodDiscoveryInfo`."""

    pod_name: str
    timestamp_ms: int  # wall clock, ms since the Unix epoch, when the sidecar wrote it
    instances: tuple[DiscoveredInstance, ...]  # sorted by instance id
    skipped: tuple[str, ...] = ()  # why each unusable instance was left out


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: the clock records are stamped with.

    Discovery timestamps cross machines (sidecar -> Redis -> resolver), so they are wall-clock
    time, not a monotonic clock; hosts are assumed NTP-synchronised, as upstream assumes.
    """
    return time.time_ns() // 1_000_000


def instance_id(pod_name: str, dp_rank: int) -> str:
    """`"<pod_name>_dp<dp_rank>"`, upstream's id of one data-parallel rank of a pod."""
    return f"{pod_name}_dp{dp_rank}"


def encode_pod(pod_name: str, instances: Sequence[DiscoveredInstance], timestamp_ms: int) -> bytes:
    """Serialize a pod's instances as a `PodDiscoveryInfo` stamped `timestamp_ms`.

    Raises:
        DiscoveryCodecError: a port or rank does not fit its int32 field.
    """
    record = discovery_pb2.PodDiscoveryInfo(pod_name=pod_name, timestamp_ms=timestamp_ms)
    try:
        for inst in instances:
            record.instances.add(
                instance_type=str(inst.instance_type), entrypoint_ip=inst.host,
                entrypoint_port=inst.port, kv_transfer_ip=inst.kv_transfer_ip,
                kv_transfer_port=inst.kv_transfer_port, dp_rank=inst.dp_rank,
                dp_size=inst.dp_size, model=inst.model, version=RECORD_VERSION)
    except ValueError as e:
        raise DiscoveryCodecError(f"pod {pod_name!r}: {e}") from e
    return record.SerializeToString()


def decode_pod(data: bytes, key_pod_name: str = "") -> PodRecord:
    """Parse a `PodDiscoveryInfo`; `key_pod_name` (from the key) fills an empty `pod_name`.

    Raises:
        DiscoveryCodecError: `data` is not a `PodDiscoveryInfo`, or names no pod.
    """
    record = discovery_pb2.PodDiscoveryInfo()
    try:
        record.ParseFromString(data)
    except DecodeError as e:
        raise DiscoveryCodecError(f"not a PodDiscoveryInfo record: {e}") from e
    pod_name = record.pod_name or key_pod_name
    if not pod_name:
        raise DiscoveryCodecError("record names no pod")
    found: dict[str, DiscoveredInstance] = {}
    skipped: list[str] = []
    for info in record.instances:
        inst = _instance(pod_name, info)
        if isinstance(inst, str):
            skipped.append(inst)
        elif inst.instance_id in found:
            skipped.append(f"{inst.instance_id}: dp_rank {info.dp_rank} listed twice")
        else:
            found[inst.instance_id] = inst
    return PodRecord(pod_name=pod_name, timestamp_ms=record.timestamp_ms,
                     instances=tuple(found[k] for k in sorted(found)), skipped=tuple(skipped))


def _instance(pod_name: str, info: discovery_pb2.InstanceDiscoveryInfo) -> DiscoveredInstance | str:
    """The instance, or why it is unusable."""
    iid = instance_id(pod_name, info.dp_rank)
    infer_type = _INFER_TYPES.get(info.instance_type)
    if infer_type is None:
        return f"{iid}: instance_type {info.instance_type!r} is not prefill, decode or neutral"
    if not info.entrypoint_ip or not 0 < info.entrypoint_port < 65536:
        return f"{iid}: no usable entrypoint ({info.entrypoint_ip!r}:{info.entrypoint_port})"
    return DiscoveredInstance(
        instance_id=iid, host=info.entrypoint_ip, port=info.entrypoint_port,
        instance_type=infer_type, kv_transfer_ip=info.kv_transfer_ip,
        kv_transfer_port=info.kv_transfer_port, dp_rank=info.dp_rank,
        dp_size=max(info.dp_size, 1), model=info.model)
