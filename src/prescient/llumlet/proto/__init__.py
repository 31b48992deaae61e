"""Upstream Llumnix's llumlet gRPC schema (`llumlet_server.proto`) and its generated messages.

The generated module is committed (regenerate with `scripts/gen_proto.sh llumlet`). Only the
messages are generated: the service's methods are bound by name in `prescient.llumlet.rpc`
(grpc's generic handlers), so no grpc-tools stub module is needed at run time.
"""
