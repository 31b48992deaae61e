"""The cluster metadata store: instance records, their wire format, and their freshness.

- `view.CmsView` holds the reader semantics (which snapshots win, which vanish, what feeds the
  predictor) and `codec` the upstream-compatible protobuf records; both are pure and belong to
  the scheduling core.
- `store` (the `CmsStore` port and `MemoryStore`), `redis_store.RedisStore` and
  `reader.CmsReader` (the polling loops) do the I/O. Import them from their modules; this
  package only re-exports the core, so importing it stays free of I/O.
"""

from prescient.cms.view import CmsUnavailableError, CmsView

__all__ = ["CmsUnavailableError", "CmsView"]
