"""The discovery record codec: upstream's wire layout, ids, and how bad records are refused."""

from __future__ import annotations

import filecmp
import importlib.util
import subprocess
from pathlib import Path

import pytest

from prescient.discovery.base import DiscoveredInstance
from prescient.discovery.codec import DiscoveryCodecError, decode_pod, encode_pod, instance_id
from prescient.discovery.proto import discovery_pb2
from prescient.model import InferType

ROOT = Path(__file__).resolve().parents[3]


def inst(pod: str, rank: int, **kw: object) -> DiscoveredInstance:
    fields: dict[str, object] = {"host": "10.0.0.1", "port": 8000 + rank, "dp_rank": rank,
                                 "dp_size": 2, "model": "m"}
    fields.update(kw)
    return DiscoveredInstance(instance_id=instance_id(pod, rank), **fields)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field_and_derives_ids() -> None:
    sent = [inst("pod-a", 1, instance_type=InferType.DECODE, kv_transfer_ip="10.0.0.9",
                 kv_transfer_port=9100), inst("pod-a", 0, instance_type=InferType.DECODE)]
    record = decode_pod(encode_pod("pod-a", sent, 1_700_000_000_123))
    assert record.pod_name == "pod-a"
    assert record.timestamp_ms == 1_700_000_000_123
    assert [i.instance_id for i in record.instances] == ["pod-a_dp0", "pod-a_dp1"]
    assert set(record.instances) == set(sent)
    assert record.skipped == ()


def test_field_numbers_are_upstreams() -> None:
    # pkg/resolver/proto/redis_discovery.proto: a record written there must read here.
    pod = {f.name: f.number for f in discovery_pb2.PodDiscoveryInfo.DESCRIPTOR.fields}
    assert pod == {"pod_name": 1, "timestamp_ms": 3, "instances": 4}
    inst_fields = {f.name: f.number for f in discovery_pb2.InstanceDiscoveryInfo.DESCRIPTOR.fields}
    assert inst_fields == {"instance_type": 1, "entrypoint_ip": 2, "entrypoint_port": 3,
                           "kv_transfer_ip": 4, "kv_transfer_port": 5, "dp_rank": 6,
                           "dp_size": 7, "model": 8, "version": 9}


def test_upstream_go_record_with_pod_ip_reads() -> None:
    # Some upstream Go versions carry `string pod_ip = 2`; it must be skipped, not fatal.
    body = encode_pod("pod-b", [inst("pod-b", 0)], 5)
    pod_ip = b"\x12\x0810.1.2.3"  # field 2, length-delimited
    record = decode_pod(pod_ip + body)
    assert [i.instance_id for i in record.instances] == ["pod-b_dp0"]


@pytest.mark.parametrize(("text", "expected"), [
    ("prefill", InferType.PREFILL), ("decode", InferType.DECODE),
    ("neutral", InferType.NEUTRAL), ("", InferType.NEUTRAL), ("normal", InferType.NEUTRAL)])
def test_instance_types(text: str, expected: InferType) -> None:
    msg = discovery_pb2.PodDiscoveryInfo(pod_name="p", timestamp_ms=1)
    msg.instances.add(instance_type=text, entrypoint_ip="h", entrypoint_port=1)
    assert decode_pod(msg.SerializeToString()).instances[0].instance_type is expected


def test_unusable_instances_are_skipped_and_named() -> None:
    msg = discovery_pb2.PodDiscoveryInfo(pod_name="p", timestamp_ms=1)
    msg.instances.add(instance_type="encoder", entrypoint_ip="h", entrypoint_port=1, dp_rank=0)
    msg.instances.add(entrypoint_ip="", entrypoint_port=1, dp_rank=1)
    msg.instances.add(entrypoint_ip="h", entrypoint_port=70000, dp_rank=2)
    msg.instances.add(entrypoint_ip="h", entrypoint_port=3, dp_rank=3)
    msg.instances.add(entrypoint_ip="h", entrypoint_port=4, dp_rank=3)
    record = decode_pod(msg.SerializeToString())
    assert [(i.instance_id, i.port) for i in record.instances] == [("p_dp3", 3)]
    assert [s.split(":")[0] for s in record.skipped] == ["p_dp0", "p_dp1", "p_dp2", "p_dp3"]
    assert "encoder" in record.skipped[0]


def test_garbage_raises_and_empty_pod_name_comes_from_the_key() -> None:
    with pytest.raises(DiscoveryCodecError, match="not a PodDiscoveryInfo"):
        decode_pod(b"not a protobuf")
    anonymous = encode_pod("", [inst("x", 0)], 1)
    with pytest.raises(DiscoveryCodecError, match="names no pod"):
        decode_pod(anonymous)
    assert decode_pod(anonymous, "from-key").instances[0].instance_id == "from-key_dp0"


def test_encode_refuses_a_port_beyond_int32() -> None:
    with pytest.raises(DiscoveryCodecError, match="pod 'p'"):
        encode_pod("p", [inst("p", 0, port=2**31)], 1)


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools (dev extra) is not installed")
def test_generated_module_matches_the_proto(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "gen_proto.sh"
    subprocess.run(["bash", str(script), "discovery", str(tmp_path)], check=True,
                   capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "PYTHON": __import__("sys").executable})
    generated = ROOT / "src" / "prescient" / "discovery" / "proto"
    for name in ("discovery_pb2.py", "discovery_pb2.pyi"):
        assert filecmp.cmp(tmp_path / name, generated / name, shallow=False), (
            f"{name} is stale: run scripts/gen_proto.sh discovery")
