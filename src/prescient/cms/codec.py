"""CMS records <-> protobuf bytes, exactly as upstream Llumnix's `cms.proto` lays them out.

The CMS keys hold serialized `cms.InstanceMetadata` / `cms.InstanceStatus` messages, so a record
written by an upstream llumlet reads here and ours reads in upstream's Go scheduler. This module
is the only place that touches the generated `cms_pb2`; everything else sees `prescient.model`
records. It is pure (no I/O, no clock), so it sits in the scheduling core.

Decoding follows protobuf's rules, as upstream's reader sees the same bytes:

- a field missing from the record reads as its zero value (`schedulable` False, `profiling_id`
  0, empty strings), not as the model's Python default; proto3 cannot tell "absent" from "zero";
- unknown fields (e.g. upstream's newer multimodal status fields 41-46) are ignored;
- Prescient's extension fields (numbers from 1001 on, e.g. metadata `max_num_seqs`) are absent
  from an upstream record and read as 0, which the model documents as "unknown";
- an empty `instance_type` reads as neutral (the proto3 default string); any other value that
  is not prefill/decode/neutral is an error naming the instance;
- the caller may pass the id it expects (from the Redis key): an empty record id is filled from
  it, a different one is an error.

Every failure raises `CmsCodecError` with the instance id and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from google.protobuf.message import DecodeError, Message

from prescient.cms.proto import cms_pb2
from prescient.errors import PrescientError
from prescient.model import InferType, InstanceMetadata, InstanceStatus

METADATA_FIELDS: tuple[str, ...] = tuple(f.name for f in msgspec.structs.fields(InstanceMetadata))
STATUS_FIELDS: tuple[str, ...] = tuple(f.name for f in msgspec.structs.fields(InstanceStatus))
_LIST_FIELDS = frozenset({"recent_waiting_requests", "waiting_requests"})
_INFER_TYPES = {t.value: t for t in InferType} | {"": InferType.NEUTRAL}


class CmsCodecError(PrescientError):
    """A CMS record cannot be encoded or decoded; the message names the instance."""


def encode_metadata(metadata: InstanceMetadata) -> bytes:
    """Serialize metadata as a `cms.InstanceMetadata` message.

    Raises:
        CmsCodecError: a value does not fit its proto field (e.g. a port beyond int32).
    """
    values = msgspec.structs.asdict(metadata)
    values["instance_type"] = str(metadata.instance_type)
    return _encode(cms_pb2.InstanceMetadata, values, metadata.instance_id)


def encode_status(status: InstanceStatus) -> bytes:
    """Serialize a status as a `cms.InstanceStatus` message.

    Raises:
        CmsCodecError: a value does not fit its proto field (e.g. a count beyond int32).
    """
    return _encode(cms_pb2.InstanceStatus, msgspec.structs.asdict(status), status.instance_id)


def decode_metadata(data: bytes, instance_id: str = "") -> InstanceMetadata:
    """Parse a `cms.InstanceMetadata` message.

    Args:
        data: the serialized message.
        instance_id: the id the caller expects (its Redis key), or "" to take the record's.

    Raises:
        CmsCodecError: the bytes are not a message, the ids disagree, or `instance_type` is
            not prefill/decode/neutral.
    """
    message = _parse(cms_pb2.InstanceMetadata, data, instance_id)
    values = {name: getattr(message, name) for name in METADATA_FIELDS}
    iid = values["instance_id"] = _checked_id(values["instance_id"], instance_id)
    values["instance_type"] = _infer_type(values["instance_type"], iid)
    return InstanceMetadata(**values)


def decode_status(data: bytes, instance_id: str = "") -> InstanceStatus:
    """Parse a `cms.InstanceStatus` message (see `decode_metadata` for the arguments).

    Raises:
        CmsCodecError: the bytes are not a message or the ids disagree.
    """
    message = _parse(cms_pb2.InstanceStatus, data, instance_id)
    values = {name: getattr(message, name) for name in STATUS_FIELDS}
    for name in _LIST_FIELDS:
        values[name] = tuple(values[name])
    values["instance_id"] = _checked_id(values["instance_id"], instance_id)
    return InstanceStatus(**values)


def _encode(message_type: type[Message], values: Mapping[str, Any],
            instance_id: str) -> bytes:
    try:
        return message_type(**values).SerializeToString()
    except (ValueError, TypeError):
        raise _encode_error(message_type, values, instance_id) from None


def _encode_error(message_type: type[Message], values: Mapping[str, Any],
                  instance_id: str) -> CmsCodecError:
    """Find the field that protobuf refused, so the error can name it."""
    for name, value in values.items():
        try:
            message_type(**{name: value})
        except (ValueError, TypeError) as exc:
            return CmsCodecError(
                f"instance {instance_id!r}: cannot encode {name}={value!r}: {exc}")
    return CmsCodecError(f"instance {instance_id!r}: cannot encode the record")


def _parse(message_type: type[Message], data: bytes, instance_id: str) -> Any:
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        name = message.DESCRIPTOR.full_name
        raise CmsCodecError(
            f"instance {instance_id or '?'!r}: not a {name} record ({len(data)} bytes): {exc}"
        ) from None
    return message


def _checked_id(record_id: str, expected: str) -> str:
    if not record_id:
        if not expected:
            raise CmsCodecError("record has no instance_id")
        return expected
    if expected and record_id != expected:
        raise CmsCodecError(f"instance {expected!r}: record names instance {record_id!r}")
    return record_id


def _infer_type(value: str, instance_id: str) -> InferType:
    infer_type = _INFER_TYPES.get(value)
    if infer_type is None:
        raise CmsCodecError(
            f"instance {instance_id!r}: instance_type {value!r} is not one of "
            "prefill, decode, neutral")
    return infer_type
