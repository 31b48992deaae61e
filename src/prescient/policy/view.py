"""What a dispatch policy sees: every instance's metadata and its last polled status."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from prescient.model import InferType, InstanceMetadata, InstanceStatus


class InstanceView(msgspec.Struct):
    """One instance as the scheduler knows it. `status` is None until the first poll."""

    metadata: InstanceMetadata
    status: InstanceStatus | None = None

    @property
    def instance_id(self) -> str:
        return self.metadata.instance_id

    @property
    def infer_type(self) -> InferType:
        return self.metadata.instance_type


class ClusterView:
    """Instances by id, iterated in id order so that equal scores break ties the same way."""

    __slots__ = ("_instances",)

    def __init__(self, instances: list[InstanceView] | None = None) -> None:
        self._instances: dict[str, InstanceView] = {}
        for inst in instances or ():
            self.add(inst)

    def add(self, instance: InstanceView) -> None:
        self._instances[instance.instance_id] = instance
        self._instances = dict(sorted(self._instances.items()))

    def remove(self, instance_id: str) -> None:
        self._instances.pop(instance_id, None)

    def get(self, instance_id: str) -> InstanceView | None:
        return self._instances.get(instance_id)

    def of_type(self, infer_type: InferType) -> list[InstanceView]:
        return [i for i in self._instances.values() if i.infer_type == infer_type]

    def __iter__(self) -> Iterator[InstanceView]:
        return iter(self._instances.values())

    def __len__(self) -> int:
        return len(self._instances)
