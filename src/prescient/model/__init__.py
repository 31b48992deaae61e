"""Plain data shared by every part of Prescient: instances, requests, decisions."""

from prescient.model.decision import Decision, Placement
from prescient.model.instance import InferType, InstanceMetadata, InstanceStatus
from prescient.model.request import Request

__all__ = ["Decision", "InferType", "InstanceMetadata", "InstanceStatus", "Placement", "Request"]
