"""Upstream Llumnix's discovery protobuf schema (`discovery.proto`) and its module `discovery_pb2`.

The generated module is committed (regenerate with `scripts/gen_discovery_proto.sh`); only
`prescient.discovery.codec` should use it, everything else handles `DiscoveredInstance` records.
"""
