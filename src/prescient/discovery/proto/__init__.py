"""Upstream Llumnix's discovery protobuf schema (`discovery.proto`) and its module `discovery_pb2`.

The generated module is committed (regenerate with `scripts/gen_proto.sh discovery`); only
`prescient.discovery.codec` should use it, everything else handles `DiscoveredInstance` records.
"""
