"""Router-local in-flight counts: what a router knows without asking any engine.

Counts go up when the router dispatches a request and down when the request finishes (or
fails). They are exact for what this router sent and blind to everything else, which is what
`least-requests` routers (vLLM production-stack, SGLang's router) rely on.
"""

from __future__ import annotations

from prescient.model import Decision, Request
from prescient.policy.framework import SchedulingContext
from prescient.policy.view import InstanceView


class LocalCounts:
    """Per instance: requests and prompt tokens dispatched and not yet finished."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self._where: dict[str, tuple[str, int]] = {}

    def on_dispatched(self, decision: Decision, request: Request, now: float) -> None:
        iid = decision.instance_id
        if iid is None or request.request_id in self._where:
            return
        self._where[request.request_id] = (iid, request.prompt_len)
        self.requests[iid] = self.requests.get(iid, 0) + 1
        self.tokens[iid] = self.tokens.get(iid, 0) + request.prompt_len

    def on_finished(self, request_id: str, now: float) -> None:
        entry = self._where.pop(request_id, None)
        if entry is not None:
            iid, tokens = entry
            self.requests[iid] -= 1
            self.tokens[iid] -= tokens


class LocalRequests:
    """Metric `local_num_requests`: requests this router has in flight on the instance."""

    name = "local_num_requests"
    lower_is_better = True

    def __init__(self, counts: LocalCounts) -> None:
        self.counts = counts

    def value(self, instance: InstanceView, ctx: SchedulingContext) -> float:
        return float(self.counts.requests.get(instance.instance_id, 0))
