"""The llumlet gRPC schema is upstream's on the wire, and the committed module matches it."""

from __future__ import annotations

import filecmp
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from prescient.errors import ConfigError
from prescient.llumlet.proto import llumlet_server_pb2 as pb
from prescient.simengine.migration import migration_slots

ROOT = Path(__file__).resolve().parents[3]

# upstream's llumlet_server.proto (reference §7.4): message -> {field: (number, type)}
UPSTREAM = {
    "MigrateRequest": {"src_engine_id": (1, "string"), "dst_engine_id": (2, "string"),
                       "dst_engine_ip": (3, "string"), "dst_engine_port": (4, "int32"),
                       "migration_type": (5, "string"), "migration_req_policy": (6, "string"),
                       "num_reqs": (7, "int64"), "num_tokens": (8, "int64"),
                       "kv_cache_usage_ratio": (9, "float"), "trigger_policy": (10, "string")},
    "MigrateResponse": {"success": (1, "bool"), "message": (2, "string")},
    "AbortRequests": {"request_ids": (1, "string")},
    "AbortResponse": {"success": (1, "bool"), "message": (2, "string")},
    "MigrateInRequest": {"serialized_migrate_req": (1, "bytes"),
                         "serialization_format": (2, "string")},
    "MigrateInResponse": {"success": (1, "bool"), "message": (2, "string")},
    "AbortMigrateInRequest": {"request_ids": (1, "string"), "migrate_in_ip_address": (2, "string"),
                              "migrate_in_port": (3, "int32")},
    "PushInstanceStatusResponse": {"success": (1, "bool"), "message": (2, "string")},
}
_TYPES = {1: "double", 2: "float", 3: "int64", 5: "int32", 8: "bool", 9: "string", 12: "bytes"}


def test_messages_and_methods_carry_upstreams_names_and_numbers() -> None:
    file = pb.DESCRIPTOR
    assert file.package == "llumlet"
    for name, fields in UPSTREAM.items():
        message = file.message_types_by_name[name]
        got = {f.name: (f.number, _TYPES[f.type]) for f in message.fields}
        assert got == fields, name
    migrate = file.message_types_by_name["MigrateRequest"]
    assert [f.name for f in migrate.oneofs_by_name["migration_value"].fields] == [
        "num_reqs", "num_tokens", "kv_cache_usage_ratio"]
    service = file.services_by_name["Llumlet"]
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name)
               for m in service.methods}
    assert methods["Migrate"] == ("llumlet.MigrateRequest", "llumlet.MigrateResponse")
    assert methods["AbortMigrateIn"] == ("llumlet.AbortMigrateInRequest", "llumlet.AbortResponse")
    assert methods["PushInstanceStatus"] == ("cms.InstanceStatus",
                                             "llumlet.PushInstanceStatusResponse")
    assert set(methods) == {"Migrate", "Abort", "MigrateIn", "AbortMigrateIn",
                            "PushInstanceStatus", "ForwardOutputs"}


def test_an_upstream_migrate_request_reads_here() -> None:
    # bytes as upstream's Go client writes them for a TOKEN command of 1024 tokens
    wire = pb.MigrateRequest(src_engine_id="a", dst_engine_id="b", dst_engine_ip="10.0.0.2",
                             dst_engine_port=5000, migration_type="TOKEN",
                             migration_req_policy="SR", num_tokens=1024,
                             trigger_policy="decode_load").SerializeToString()
    assert wire[:3] == b"\x0a\x01a"  # field 1, length-delimited, "a"
    assert b"\x40\x80\x08" in wire  # field 8 varint 1024
    back = pb.MigrateRequest.FromString(wire)
    assert back.WhichOneof("migration_value") == "num_tokens" and back.num_tokens == 1024


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools (dev extra) is not installed")
def test_the_script_regenerates_the_committed_module(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), "llumlet", str(tmp_path)],
                   check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    committed = ROOT / "src" / "prescient" / "llumlet" / "proto"
    for name in ("llumlet_server_pb2.py", "llumlet_server_pb2.pyi"):
        assert filecmp.cmp(tmp_path / name, committed / name, shallow=False), (
            f"{name} is stale: run scripts/gen_proto.sh llumlet")


def test_migration_slots_come_from_upstreams_environment_variables() -> None:
    assert migration_slots({}) == {"max_req_mig_out": 1, "max_req_mig_in": 1}
    assert migration_slots({"LLUMNIX_MAX_REQ_MIG_OUT": "4"})["max_req_mig_out"] == 4
    with pytest.raises(ConfigError, match="LLUMNIX_MAX_REQ_MIG_IN='0'"):
        migration_slots({"LLUMNIX_MAX_REQ_MIG_IN": "0"})
