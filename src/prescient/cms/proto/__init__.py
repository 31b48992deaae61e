"""Upstream Llumnix's CMS protobuf schema (`cms.proto`) and its generated module `cms_pb2`.

The generated module is committed (regenerate with `scripts/gen_proto.sh cms`); only
`prescient.cms.codec` should use it, everything else handles `prescient.model` records.
"""
