from __future__ import annotations

import random

import msgspec
import pytest

from prescient.cms.view import ProfilingSample
from prescient.config.scheduler import SchedulerSettings
from prescient.model import InferType, InstanceMetadata, InstanceStatus, Request
from prescient.policy import make_dispatcher
from prescient.policy.account import LocalAccount
from prescient.policy.framework import SchedulingContext
from prescient.policy.metrics import make_metric
from prescient.policy.state import ClusterState
from prescient.predict.enhanced import PredictorEnhancement
from prescient.predict.quadratic import PredictorBank


def linear_samples(iid: str, n: int = 30) -> list[ProfilingSample]:
    tokens = range(500, 500 + 100 * n, 100)
    return [ProfilingSample(instance_id=iid, num_scheduled_prefill_tokens=x,
                            step_duration_ms=10.0 + 0.01 * x) for x in tokens]


def state(kind: InferType = InferType.NEUTRAL, budget: int = 0) -> ClusterState:
    st = ClusterState([InstanceMetadata(instance_id="i0", instance_type=kind,
                                        max_num_batched_tokens=budget)])
    st.set_status(0, InstanceStatus(instance_id="i0", timestamp_ms=0, update_id=1,
                                    num_uncomputed_tokens_all_waiting_prefills=10_000,
                                    num_total_gpu_tokens=100_000))
    return st


def test_replay_subtracts_what_the_instance_computed_since_its_status() -> None:
    feature = PredictorEnhancement(PredictorBank(20, shared=True), max_num_batched_tokens=8192)
    st = state()
    feature.on_statuses(st, linear_samples("i0"), 0.0)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), st, 0.05, random.Random(0))
    feature.prepare(ctx)
    # 50 ms: one 8192-token step takes 10 + 81.92 ms, so 50/91.92 of it is apportioned
    assert ctx.predicted_computed_tokens[0] == round(8192 * 50 / 91.92)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), st, 0.5, random.Random(0))
    feature.prepare(ctx)
    assert ctx.predicted_computed_tokens[0] == 10_000  # all of it, and never more
    assert make_metric("all_prefills_tokens_num").compute(ctx)[0] == 0


def test_decode_instances_and_unfitted_predictors_predict_nothing() -> None:
    feature = PredictorEnhancement(PredictorBank(20), max_num_batched_tokens=8192)
    st = state(InferType.DECODE)
    feature.on_statuses(st, linear_samples("i0"), 0.0)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), st, 0.5, random.Random(0))
    feature.prepare(ctx)
    assert ctx.predicted_computed_tokens[0] == 0
    fresh = PredictorEnhancement(PredictorBank(20), max_num_batched_tokens=8192)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), state(), 0.5, random.Random(0))
    fresh.prepare(ctx)
    assert ctx.predicted_computed_tokens[0] == 0
    with pytest.raises(ValueError, match="max-num-batched-tokens"):
        PredictorEnhancement(PredictorBank(20), max_num_batched_tokens=0)


def test_the_instance_budget_wins_over_the_flag() -> None:
    feature = PredictorEnhancement(PredictorBank(20, shared=True), max_num_batched_tokens=65536)
    st = state(budget=1000)
    feature.on_statuses(st, linear_samples("i0"), 0.0)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), st, 0.04, random.Random(0))
    feature.prepare(ctx)
    assert ctx.predicted_computed_tokens[0] == 2000  # two 20 ms steps of 1,000 tokens


def test_load_balance_gets_the_feature_only_in_full_mode_when_enabled() -> None:
    on = msgspec.structs.replace(SchedulerSettings(), enable_predictor_enhanced_scheduling=True)
    assert make_dispatcher("load-balance", on, random.Random(0)).features
    assert not make_dispatcher("load-balance", SchedulerSettings(), random.Random(0)).features
    lite = msgspec.structs.replace(on, enable_full_mode_scheduling=False,
                                   dispatch_neutral_load_metric="num_tokens")
    assert not make_dispatcher("load-balance", lite, random.Random(0)).features


def test_per_instance_predictors_keep_one_bank_entry_per_instance() -> None:
    per = msgspec.structs.replace(SchedulerSettings(), enable_predictor_enhanced_scheduling=True,
                                  per_instance_predictors=True)
    bank = make_dispatcher("load-balance", per, random.Random(0)).features[0].bank
    assert not bank.shared
    on = msgspec.structs.replace(per, per_instance_predictors=False)
    assert make_dispatcher("load-balance", on, random.Random(0)).features[0].bank.shared


def with_account(backlog: int, dispatches: list[tuple[str, int, float]]
                 ) -> tuple[PredictorEnhancement, ClusterState, LocalAccount]:
    """One neutral instance, status stamped at 0 with `backlog` waiting tokens, a fitted
    linear predictor (10 ms + 0.01 ms/token), and the (id, tokens, dispatch s) counted."""
    account = LocalAccount()
    for rid, tokens, at in dispatches:
        account.add(rid, "i0", InferType.NEUTRAL, tokens, tokens, at)
    st = ClusterState([InstanceMetadata(instance_id="i0")])
    st.set_status(0, InstanceStatus(instance_id="i0", timestamp_ms=0, update_id=1,
                                    num_uncomputed_tokens_all_waiting_prefills=backlog,
                                    num_total_gpu_tokens=100_000))
    st.set_account(0, msgspec.structs.astuple(account.totals("i0")))
    feature = PredictorEnhancement(PredictorBank(20, shared=True), 8192, account)
    feature.on_statuses(st, linear_samples("i0"), 0.0)
    return feature, st, account


def predicted_and_load(feature: PredictorEnhancement, st: ClusterState, now: float
                       ) -> tuple[float, float]:
    ctx = SchedulingContext(Request(request_id="x", prompt_len=10), st, now, random.Random(0))
    feature.prepare(ctx)
    return ctx.predicted_computed_tokens[0], make_metric("all_prefills_tokens_num").compute(ctx)[0]


def test_dispatched_prompts_are_replayed_behind_the_backlog_from_their_dispatch() -> None:
    # backlog 1000 tokens: 0-20 ms; the 2000-token prompt dispatched at 30 ms: 30-60 ms
    feature, st, _ = with_account(1000, [("r1", 2000, 0.030)])
    assert predicted_and_load(feature, st, 0.025) == (1000, 2000)  # before its dispatch
    assert predicted_and_load(feature, st, 0.030) == (1000, 2000)  # dispatched just now
    # 10 of its 30 ms; replaying the status alone would leave the load at 2000, and a lump
    # of 3000 tokens queued at the status (upstream) would be done by now (load 0)
    assert predicted_and_load(feature, st, 0.040) == (1000 + 667, 1333)
    assert predicted_and_load(feature, st, 10.0) == (3000, 0)  # all of it, never more


def test_a_prompt_queued_before_the_status_counts_from_the_status_on() -> None:
    # in flight since -10 ms yet not in the status: 3000 tokens share one 40 ms step
    feature, st, _ = with_account(1000, [("r1", 2000, -0.010)])
    assert predicted_and_load(feature, st, 0.020) == (1500, 1500)


def test_a_reconciled_prompt_leaves_the_replay_with_the_account() -> None:
    feature, st, account = with_account(1000, [("r1", 2000, 0.005), ("r2", 500, 0.010)])
    # r1 shows up as waiting in the next status; only r2 stays in flight
    account.reconcile("i0", ["r1"], ["r1"], 0.050)
    st.set_account(0, msgspec.structs.astuple(account.totals("i0")))
    times, tokens = account.inflight_prefills("i0")
    assert times.tolist() == [0.010] and tokens.tolist() == [500]
    # 1000 at 0 ms then 500 from 20 ms: 0-20 ms and 20-35 ms
    assert predicted_and_load(feature, st, 0.035) == (1500, 0)


def test_load_balance_picks_on_the_replayed_account() -> None:
    on = msgspec.structs.replace(SchedulerSettings(), enable_predictor_enhanced_scheduling=True)
    dispatcher = make_dispatcher("load-balance", on, random.Random(0))
    dispatcher.on_instances({i: InstanceMetadata(instance_id=i) for i in ("i0", "i1")}, 0.0)
    dispatcher.features[0].on_statuses(dispatcher.state, linear_samples("i0"), 0.0)
    dispatcher.on_statuses({
        "i0": InstanceStatus(instance_id="i0", timestamp_ms=0, update_id=1,
                             num_total_gpu_tokens=100_000),
        "i1": InstanceStatus(instance_id="i1", timestamp_ms=0, update_id=1,
                             num_uncomputed_tokens_all_waiting_prefills=6000,
                             num_total_gpu_tokens=100_000)}, 0.0)
    first = dispatcher.schedule(Request(request_id="r1", prompt_len=2000), 0.030)
    assert first.instance_id == "i0"  # empty vs 6000 tokens (70 ms), 30 ms in
    # at 50 ms i0 has 667 of r1 left (30 ms step from 30 ms), i1 1714 of its 6000; counting
    # r1 whole (2000), as without the account's replay, would send r2 to i1
    second = dispatcher.schedule(Request(request_id="r2", prompt_len=100), 0.050)
    assert second.instance_id == "i0"


def test_equal_prefill_loads_fall_through_to_decodes_with_prediction_only() -> None:
    statuses = {i: InstanceStatus(instance_id=i, timestamp_ms=0, update_id=1,
                                  scheduler_running_to_decode_requests_num=d,
                                  num_total_gpu_tokens=100_000)
                for i, d in (("i0", 30), ("i1", 5), ("i2", 12))}
    picks = {}
    for predict in (False, True):
        settings = msgspec.structs.replace(SchedulerSettings(),
                                           enable_predictor_enhanced_scheduling=predict)
        dispatcher = make_dispatcher("load-balance", settings, random.Random(0))
        dispatcher.on_instances({i: InstanceMetadata(instance_id=i) for i in statuses}, 0.0)
        dispatcher.on_statuses(statuses, 0.0)
        picks[predict] = dispatcher.schedule(Request(request_id="r", prompt_len=100),
                                             0.010).instance_id
    # every queue is empty: the lowest id without prediction, the fewest decodes with it
    assert picks == {False: "i0", True: "i1"}


@pytest.mark.parametrize("limit", [0, 6])  # the engines' max_num_seqs; 0: unknown
def test_the_kept_replay_equals_a_fresh_one_through_dispatches_polls_and_releases(
        limit: int) -> None:
    """The feature keeps each instance's replay between decisions; a feature built afresh at
    every decision (replaying every status and account from scratch) predicts the same."""
    on = msgspec.structs.replace(SchedulerSettings(), enable_predictor_enhanced_scheduling=True)
    dispatcher = make_dispatcher("load-balance", on, random.Random(0))
    ids = [f"i{k}" for k in range(5)]
    dispatcher.on_instances({i: InstanceMetadata(instance_id=i, max_num_seqs=limit)
                             for i in ids}, 0.0)
    feature = dispatcher.features[0]
    feature.on_statuses(dispatcher.state, linear_samples("i0"), 0.0)
    checked, limited = [], []

    def prepare_and_compare(ctx: SchedulingContext, kept=feature.prepare) -> None:
        kept(ctx)
        fresh = SchedulingContext(ctx.request, ctx.state, ctx.now, random.Random(0))
        scratch = PredictorEnhancement(feature.bank, feature.max_num_batched_tokens,
                                       feature.account)
        scratch.completion_rate_per_ms = feature.completion_rate_per_ms
        scratch.prepare(fresh)
        assert ctx.predicted_computed_tokens.tolist() == fresh.predicted_computed_tokens.tolist()
        checked.append(ctx.predicted_computed_tokens.sum())
        unlimited = SchedulingContext(ctx.request, ctx.state, ctx.now, random.Random(0))
        PredictorEnhancement(feature.bank, feature.max_num_batched_tokens, feature.account,
                             seq_limit=False).prepare(unlimited)
        limited.append(unlimited.predicted_computed_tokens.sum() - checked[-1])

    feature.prepare = prepare_and_compare
    rng = random.Random(5)
    rates: list[float] = []
    placed: dict[str, str] = {}
    now, update = 0.0, 0
    for k in range(600):
        now += rng.expovariate(300.0)
        if k % 60 == 0:  # a poll: part of what was placed shows up as waiting
            update += 1
            statuses = {}
            for iid in ids:
                mine = [r for r, i in placed.items() if i == iid and rng.random() < 0.5]
                statuses[iid] = InstanceStatus(
                    instance_id=iid, timestamp_ms=int(now * 1000) - rng.randint(0, 30),
                    update_id=update, recent_waiting_requests=tuple(mine),
                    waiting_requests=tuple(mine),
                    num_uncomputed_tokens_all_waiting_prefills=rng.randint(0, 30_000),
                    num_uncomputed_tokens_scheduler_running_prefills=rng.choice([0, 700]),
                    num_running_requests=rng.randint(0, 8), num_waiting_requests=len(mine),
                    num_total_gpu_tokens=10**7)
            dispatcher.on_statuses(statuses, now)
            rates.append(feature.completion_rate_per_ms)
        if placed and rng.random() < 0.2:  # a request finishes
            done = rng.choice(sorted(placed))
            dispatcher.release(done, now)
            del placed[done]
        rid = f"r{k}"
        result = dispatcher.schedule(Request(request_id=rid, prompt_len=rng.randint(50, 4000)),
                                     now)
        placed[rid] = result.instance_id
    assert len(checked) == 600 and sum(x > 0 for x in checked) > 500
    assert sum(r > 0 for r in rates) >= 8  # the slots were freed at a rate after warm-up
    assert min(limited) >= 0  # a seq limit only ever delays prefills
    assert (sum(x > 0 for x in limited) > 100) == (limit > 0)


@pytest.mark.parametrize(("unallocated", "expected"), [
    (0, 1000),  # its 1000 tokens are in the step in flight, half done on average: ends at 10 ms
    (1000, 500),  # nothing of it scheduled yet: the step starts at the status (20 ms)
])
def test_a_step_in_flight_at_the_status_is_half_done(unallocated: int, expected: int) -> None:
    feature = PredictorEnhancement(PredictorBank(20, shared=True), max_num_batched_tokens=8192)
    st = ClusterState([InstanceMetadata(instance_id="i0")])
    st.set_status(0, InstanceStatus(
        instance_id="i0", timestamp_ms=0, update_id=1,
        num_uncomputed_tokens_scheduler_running_prefills=1000,
        num_unallocated_tokens_scheduler_running_prefills=unallocated,
        num_total_gpu_tokens=100_000))
    feature.on_statuses(st, linear_samples("i0"), 0.0)
    ctx = SchedulingContext(Request(request_id="r", prompt_len=10), st, 0.010, random.Random(0))
    feature.prepare(ctx)
    assert ctx.predicted_computed_tokens[0] == expected


def full_instance(limit: int, *, running: int, waiting: int = 0, waiting_tokens: int = 0,
                  dispatches: tuple[tuple[str, int, float], ...] = (),
                  rate_per_ms: float = 0.01, seq_limit: bool = True,
                  ) -> tuple[PredictorEnhancement, ClusterState]:
    """One neutral instance whose engine runs at most `limit` requests (0: unknown), status
    at 0 ms with `running` requests and `waiting` prompts, the (id, tokens, dispatch s) in
    flight, a linear step time (10 ms + 0.01 ms/token) and a completion rate of
    `rate_per_ms` (one slot per 100 ms by default)."""
    account = LocalAccount()
    for rid, tokens, at in dispatches:
        account.add(rid, "i0", InferType.NEUTRAL, tokens, tokens, at)
    st = ClusterState([InstanceMetadata(instance_id="i0", max_num_seqs=limit)])
    st.set_status(0, InstanceStatus(
        instance_id="i0", timestamp_ms=0, update_id=1, num_running_requests=running,
        scheduler_running_to_decode_requests_num=running, num_waiting_requests=waiting,
        num_uncomputed_tokens_all_waiting_prefills=waiting_tokens,
        num_total_gpu_tokens=100_000))
    st.set_account(0, msgspec.structs.astuple(account.totals("i0")))
    feature = PredictorEnhancement(PredictorBank(20, shared=True), 8192, account,
                                   decode_aware=False, seq_limit=seq_limit)
    feature.on_statuses(st, linear_samples("i0"), 0.0)
    feature.completion_rate_per_ms = rate_per_ms
    return feature, st


def predicted(feature: PredictorEnhancement, st: ClusterState, now: float) -> int:
    ctx = SchedulingContext(Request(request_id="x", prompt_len=10), st, now, random.Random(0))
    feature.prepare(ctx)
    return int(ctx.predicted_computed_tokens[0])


def test_a_full_instance_computes_no_dispatched_prompt_until_a_slot_frees() -> None:
    # 4 of 4 slots taken at the status; a slot frees at 100 ms, then the prompt's one
    # 2000-token step takes 30 ms
    feature, st = full_instance(4, running=4, dispatches=(("r1", 2000, 0.010),))
    assert [predicted(feature, st, t) for t in (0.05, 0.099, 0.115, 0.13, 1.0)] == [
        0, 0, 1000, 2000, 2000]
    # unknown limit, or the limit off: computed from its dispatch at 10 ms (done at 40 ms)
    for unknown in (full_instance(0, running=4, dispatches=(("r1", 2000, 0.010),)),
                    full_instance(4, running=4, dispatches=(("r1", 2000, 0.010),),
                                  seq_limit=False)):
        assert predicted(*unknown, 0.025) == 1000
        assert predicted(*unknown, 0.05) == 2000


def test_free_slots_are_taken_in_dispatch_order_then_wait_for_completions() -> None:
    # one slot free: r1 starts at its dispatch (0-20 ms), r2 waits for the first completion
    # (100 ms; 1000 tokens: 20 ms), r3 for the second (200 ms)
    feature, st = full_instance(4, running=3, dispatches=(
        ("r1", 1000, 0.0), ("r2", 1000, 0.001), ("r3", 1000, 0.002)))
    assert [predicted(feature, st, t) for t in (0.02, 0.099, 0.12, 0.2, 0.22)] == [
        1000, 1000, 2000, 2000, 3000]


def test_waiting_prompts_beyond_the_free_slots_wait_for_theirs() -> None:
    # full: the status's two waiting prompts (3000 tokens: 1500 each) start at 100 and 200 ms
    feature, st = full_instance(4, running=4, waiting=2, waiting_tokens=3000)
    assert [predicted(feature, st, t) for t in (0.05, 0.125, 0.2, 0.225, 1.0)] == [
        0, 1500, 1500, 3000, 3000]
    # nothing frees slots (no completion rate yet): no limit applied, as without one
    feature, st = full_instance(4, running=4, waiting=2, waiting_tokens=3000, rate_per_ms=0)
    assert predicted(feature, st, 0.04) == 3000


def test_the_completion_rate_is_the_dispatch_rate_and_shared_by_running_requests() -> None:
    feature, st = full_instance(4, running=4)
    for k in range(40):  # 40 dispatches in 2 s
        ctx = SchedulingContext(Request(request_id=f"r{k}", prompt_len=10), st, k * 0.05,
                                random.Random(0))
        feature.prepare(ctx)
    feature.on_statuses(st, [], 2.0)
    assert feature.completion_rate_per_ms == pytest.approx(40 / 2000)
    feature.on_statuses(st, [], 40.0)  # the window (30 s) forgot them
    assert feature.completion_rate_per_ms == 0.0


def test_a_metadata_record_without_the_seq_limit_replays_as_before() -> None:
    from prescient.cms.codec import decode_metadata
    from prescient.cms.proto import cms_pb2

    upstream = decode_metadata(cms_pb2.InstanceMetadata(instance_id="i0").SerializeToString())
    assert upstream.max_num_seqs == 0
    runs = []
    for seq_limit in (True, False):
        feature, st = full_instance(upstream.max_num_seqs, running=4, waiting=3,
                                    waiting_tokens=9000, seq_limit=seq_limit,
                                    dispatches=(("r1", 2000, 0.01), ("r2", 700, 0.2)))
        runs.append([predicted(feature, st, t / 100) for t in range(60)])
    assert runs[0] == runs[1] and runs[0][-1] == 11_700


def test_the_simulator_registers_each_engines_seq_limit() -> None:
    from prescient.sim.cluster import ClusterSim, InstanceSpec, SimSettings

    specs = [InstanceSpec(instance_id="a", max_num_seqs=64), InstanceSpec(instance_id="b")]
    sim = ClusterSim([Request(request_id="r", prompt_len=10, output_len=2)], specs,
                     "load-balance", SimSettings())
    assert [m.max_num_seqs for m in sim.policy.state.metadata] == [64, 256]
