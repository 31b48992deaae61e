"""SLO-aware scheduling as a dispatcher feature: predicted TTFT and TPOT per instance.

Before the `slo` policy's pipelines run, this fills `ctx.predicted_ttft_ms` and
`ctx.predicted_tpot_ms` from the offline profiles (`SloLatencyModel`), using the same load
columns the metrics use (`all_prefills_tokens_num`, after any predictor-enhanced correction,
`decode_batch_size`, `all_decodes_tokens_num`), so the two features compose: predictor first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prescient.policy.framework import SchedulingContext
from prescient.policy.metrics import make_metric
from prescient.policy.state import ClusterState
from prescient.predict.quadratic import ProfilingSampleLike

if TYPE_CHECKING:
    from prescient.predict.slo import SloLatencyModel

_ALL_PREFILLS = make_metric("all_prefills_tokens_num")
_DECODE_BATCH = make_metric("decode_batch_size")
_DECODE_TOKENS = make_metric("all_decodes_tokens_num")


class SloPrediction:
    """Fills the predicted-latency columns the `predicted_ttft` / `predicted_tpot` metrics read."""

    def __init__(self, model: SloLatencyModel) -> None:
        self.model = model

    def on_statuses(self, state: ClusterState, samples: Sequence[ProfilingSampleLike],
                    now: float) -> None:
        """Nothing to learn online: the profiles are offline."""

    def prepare(self, ctx: SchedulingContext) -> None:
        prompt = ctx.request.prompt_len
        dbs, adt = ctx.metric(_DECODE_BATCH), ctx.metric(_DECODE_TOKENS)
        ctx.predicted_ttft_ms, ctx.predicted_tpot_ms = self.model.predicted_ms(
            ctx.state, prompt, ctx.now, ctx.metric(_ALL_PREFILLS), dbs, adt)
