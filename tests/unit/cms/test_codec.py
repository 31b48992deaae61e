"""The CMS codec: model records <-> upstream `cms.proto` bytes."""

from __future__ import annotations

import msgspec
import pytest

from prescient.cms.codec import (
    METADATA_FIELDS,
    STATUS_FIELDS,
    CmsCodecError,
    decode_metadata,
    decode_status,
    encode_metadata,
    encode_status,
)
from prescient.cms.proto import cms_pb2
from prescient.model import InferType, InstanceMetadata, InstanceStatus


def full_metadata() -> InstanceMetadata:
    """Metadata with every field away from its default."""
    return InstanceMetadata(
        instance_id="inst-1", instance_type=InferType.DECODE, backend_type="vLLM v1",
        ip="10.0.0.1", ip_kvs="10.0.1.1", api_server_port=8000, llumlet_port=9000,
        kvt_port=28000, node_id="node-7", data_parallel_size=4, tensor_parallel_size=2,
        unit_id="unit-3", dp_rank=3, ep_rank=5, dp_local_rank=1, utc_create=1.7e9 + 0.25,
        utc_update=1.7e9 + 9.5, ip_kvt="10.0.2.1", block_size=32, max_num_batched_tokens=8192,
        max_num_seqs=256)


def full_status() -> InstanceStatus:
    """A status with every field away from its default, each int field distinct."""
    values: dict[str, object] = {}
    for number, field in enumerate(msgspec.structs.fields(InstanceStatus), start=1):
        if field.type is int:
            values[field.name] = 1000 + number
        elif field.type is float:
            values[field.name] = number + 0.5
    values.update(instance_id="inst-1", schedulable=False, timestamp_ms=1_760_000_000_123,
                  recent_waiting_requests=("r1",), waiting_requests=("r1", "r2"),
                  profiling_id=7)
    return InstanceStatus(**values)  # type: ignore[arg-type]


# Prescient's extension fields: numbered far above upstream's (1-20 and 1-40)
EXTENSIONS = {"InstanceMetadata": {"max_num_seqs": 1001}, "InstanceStatus": {}}


def test_model_fields_are_the_proto_fields_in_number_order() -> None:
    for message, fields in ((cms_pb2.InstanceMetadata, METADATA_FIELDS),
                            (cms_pb2.InstanceStatus, STATUS_FIELDS)):
        descriptor = message.DESCRIPTOR
        extensions = EXTENSIONS[descriptor.name]
        assert [f.name for f in descriptor.fields] == list(fields)
        upstream = len(fields) - len(extensions)
        assert [f.number for f in descriptor.fields] == [*range(1, upstream + 1),
                                                         *extensions.values()]
        assert list(fields[upstream:]) == list(extensions)
    assert len(METADATA_FIELDS) == 20 + 1
    assert len(STATUS_FIELDS) == 40


def test_an_upstream_metadata_record_reads_the_seq_limit_as_unknown() -> None:
    ours = full_metadata()
    upstream_fields = {name: getattr(ours, name) for name in METADATA_FIELDS
                       if name not in EXTENSIONS["InstanceMetadata"]}
    upstream_fields["instance_type"] = str(ours.instance_type)
    written_upstream = cms_pb2.InstanceMetadata(**upstream_fields).SerializeToString()
    decoded = decode_metadata(written_upstream)
    assert decoded.max_num_seqs == 0  # unknown
    assert decoded == msgspec.structs.replace(ours, max_num_seqs=0)
    # ours is upstream's record plus field 1001 (varint), which upstream skips as unknown
    assert encode_metadata(ours) == written_upstream + bytes([0xC8, 0x3E, 0x80, 0x02])


def test_every_field_differs_from_its_default_in_the_fixtures() -> None:
    for record, blank in ((full_metadata(), InstanceMetadata(instance_id="x")),
                          (full_status(), InstanceStatus(instance_id="x"))):
        for field in msgspec.structs.fields(record):
            assert getattr(record, field.name) != getattr(blank, field.name), field.name


def test_metadata_round_trips_every_field() -> None:
    metadata = full_metadata()
    assert decode_metadata(encode_metadata(metadata)) == metadata
    assert decode_metadata(encode_metadata(metadata), "inst-1") == metadata


def test_status_round_trips_every_field() -> None:
    status = full_status()
    decoded = decode_status(encode_status(status))
    assert decoded == status
    assert decoded.waiting_requests == ("r1", "r2")  # a tuple again, not a proto container


def test_negative_profiling_id_and_int64_timestamp_survive() -> None:
    status = InstanceStatus(instance_id="a", profiling_id=-1, timestamp_ms=2**40)
    decoded = decode_status(encode_status(status))
    assert (decoded.profiling_id, decoded.timestamp_ms) == (-1, 2**40)


def test_reads_a_record_written_with_the_proto_module_directly() -> None:
    data = cms_pb2.InstanceStatus(instance_id="up", schedulable=True, update_id=9,
                                  num_running_requests=3, waiting_requests=["x"],
                                  step_duration=12.5).SerializeToString()
    status = decode_status(data)
    assert status == InstanceStatus(instance_id="up", update_id=9, num_running_requests=3,
                                    waiting_requests=("x",), step_duration=12.5,
                                    profiling_id=0)
    written = cms_pb2.InstanceStatus.FromString(encode_status(status))
    assert (written.instance_id, written.num_running_requests, list(written.waiting_requests)
            ) == ("up", 3, ["x"])


def test_unknown_fields_are_ignored() -> None:
    # upstream's field 41 (mm_waiting_image_status {num_items: 1}) and an unknown varint 99
    extra = bytes([0xCA, 0x02, 0x02, 0x08, 0x01]) + bytes([0x98, 0x06, 0x05])
    status = InstanceStatus(instance_id="a", num_running_requests=2)
    assert decode_status(encode_status(status) + extra) == status


def test_missing_fields_read_as_protobuf_zero_values() -> None:
    status = decode_status(b"", "a")
    assert status == InstanceStatus(instance_id="a", schedulable=False, profiling_id=0)
    metadata = decode_metadata(cms_pb2.InstanceMetadata(ip="h").SerializeToString(), "a")
    assert metadata == InstanceMetadata(
        instance_id="a", instance_type=InferType.NEUTRAL, ip="h", backend_type="", node_id="",
        data_parallel_size=0, tensor_parallel_size=0, block_size=0)


def test_a_record_without_any_id_is_an_error() -> None:
    with pytest.raises(CmsCodecError, match="no instance_id"):
        decode_status(b"")


def test_a_record_naming_another_instance_is_an_error() -> None:
    data = encode_status(InstanceStatus(instance_id="b"))
    with pytest.raises(CmsCodecError, match="'a': record names instance 'b'"):
        decode_status(data, "a")


@pytest.mark.parametrize("garbage", [b"not a protobuf", b"\x0a\x05ab", b"\xff\xff\xff\xff"])
def test_garbage_bytes_are_a_clear_error(garbage: bytes) -> None:
    with pytest.raises(CmsCodecError, match=r"instance 'a': not a cms.InstanceStatus record"):
        decode_status(garbage, "a")
    with pytest.raises(CmsCodecError, match=r"not a cms.InstanceMetadata record"):
        decode_metadata(garbage, "a")


def test_an_unknown_instance_type_names_the_instance() -> None:
    data = cms_pb2.InstanceMetadata(instance_id="a", instance_type="gpu").SerializeToString()
    with pytest.raises(CmsCodecError, match="instance 'a': instance_type 'gpu' is not one of"):
        decode_metadata(data)


def test_every_infer_type_reads_back() -> None:
    for infer_type in InferType:
        metadata = InstanceMetadata(instance_id="a", instance_type=infer_type)
        assert decode_metadata(encode_metadata(metadata)).instance_type is infer_type


def test_a_count_beyond_int32_is_refused_naming_the_field() -> None:
    status = InstanceStatus(instance_id="a", num_used_gpu_tokens=2**31)
    with pytest.raises(CmsCodecError, match=r"'a': cannot encode num_used_gpu_tokens=2147483648"):
        encode_status(status)
