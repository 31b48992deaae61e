"""The committed `cms_pb2` module matches `cms.proto` (regenerate with scripts/gen_proto.sh)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from prescient.cms.proto import cms_pb2

pytest.importorskip("grpc_tools")

PROTO_DIR = Path(cms_pb2.__file__).parent
SCRIPT = PROTO_DIR.parents[3] / "scripts" / "gen_proto.sh"
VERSION = re.compile(r"^# Protobuf Python Version: (.+)$", re.MULTILINE)


def test_the_module_describes_exactly_the_proto_file(tmp_path: Path) -> None:
    out = tmp_path / "cms.desc"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
                    f"--descriptor_set_out={out}", str(PROTO_DIR / "cms.proto")], check=True)
    [from_proto] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for message in from_proto.message_type:
        for field in message.field:
            field.ClearField("json_name")  # protoc's --python_out leaves the default out
    committed = descriptor_pb2.FileDescriptorProto.FromString(cms_pb2.DESCRIPTOR.serialized_pb)
    assert committed == from_proto
    assert committed.package == "cms"


def test_the_script_regenerates_the_committed_files(tmp_path: Path) -> None:
    subprocess.run(["bash", str(SCRIPT), "cms", str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    generated = (tmp_path / "cms_pb2.py").read_text()
    committed = (PROTO_DIR / "cms_pb2.py").read_text()
    if VERSION.findall(generated) != VERSION.findall(committed):
        pytest.skip("installed grpcio-tools differs from the one that generated cms_pb2.py")
    assert generated == committed
    assert (tmp_path / "cms_pb2.pyi").read_text() == (PROTO_DIR / "cms_pb2.pyi").read_text()
