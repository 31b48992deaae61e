"""The cluster metadata store as the scheduler sees it: instance records and their freshness.

`CmsView` holds the reader semantics (which snapshots win, which vanish, what feeds the
predictor); it is pure, and the Redis polling loop that feeds it lives beside it.
"""

from prescient.cms.view import CmsUnavailableError, CmsView

__all__ = ["CmsUnavailableError", "CmsView"]
