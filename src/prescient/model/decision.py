"""What a dispatch policy returns: where each leg of a request runs."""

from __future__ import annotations

import msgspec

from prescient.model.instance import InferType


class Placement(msgspec.Struct, frozen=True):
    """One leg of a request on one instance."""

    instance_id: str
    infer_type: InferType = InferType.NEUTRAL


class Decision(msgspec.Struct, frozen=True):
    """Placements in order (prefill first for PD); empty means no instance is available."""

    request_id: str
    placements: tuple[Placement, ...] = ()

    @property
    def instance_id(self) -> str | None:
        """The instance of the first leg, or None when nothing was available."""
        return self.placements[0].instance_id if self.placements else None
