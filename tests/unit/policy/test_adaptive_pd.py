"""Adaptive PD on hand-built views: roles, prefill and decode choices, conversion (§5.3)."""

from __future__ import annotations

import json
import random

import msgspec
import pytest

from prescient.config.scheduler import SchedulerSettings
from prescient.errors import ConfigError
from prescient.model import InferType, InstanceMetadata, InstanceStatus, Request
from prescient.policy import Dispatcher, SchedulingMode, make_dispatcher
from prescient.policy.adaptive_pd import AdaptivePdRoles, reservations_of
from prescient.predict.slo import SloLatencyModel, load_tpot_profile, load_ttft_profile
from prescient.rescheduler import make_rescheduler

from .conftest import meta, state_of, status

# TTFT: 10 ms + 0.1 ms per token; TPOT: 5 ms + 0.5 ms per request in the batch. With a 30 ms
# TPOT SLO and threshold 0.85 the decode limit is 25.5 ms: a batch of at most 40 (39 + the new one)
TTFT = {"results": [{"tokens_num": n, "p50": 10 + 0.1 * n} for n in (10, 100, 1000, 8000)]}
TPOT = {"results": [{"batch_size": b, "tokens_per_request": t, "p50": 5 + 0.5 * b}
                    for b in (1, 8, 64) for t in (8, 512, 2048)]}
NOW = 1.0


def model() -> SloLatencyModel:
    return SloLatencyModel.from_profiles(load_ttft_profile(json.dumps(TTFT).encode(), "ttft"),
                                         load_tpot_profile(json.dumps(TPOT).encode(), "tpot"))


def flags(**kw: object) -> SchedulerSettings:
    base = SchedulerSettings(enable_adaptive_pd=True, tpot_slo=30.0, ttft_slo=6000.0,
                             tpot_slo_dispatch_threshold=0.85)
    return msgspec.structs.replace(base, **kw)


def loaded(iid: str, *, decoding: int = 0, prefill_tokens: int = 0) -> InstanceStatus:
    """An instance decoding `decoding` requests of 512 tokens, with prefill work queued."""
    return status(iid, scheduler_running_to_decode_requests_num=decoding,
                  scheduler_running_to_decode_tokens_num=512 * decoding,
                  num_uncomputed_tokens_all_waiting_prefills=prefill_tokens)


def cluster(**statuses: InstanceStatus) -> Dispatcher:
    d = make_dispatcher("slo", flags(), random.Random(0), slo_model=model())
    d.on_instances({i: InstanceMetadata(instance_id=i, max_num_batched_tokens=8000)
                    for i in statuses}, 0.0)
    d.on_statuses(statuses, NOW)
    return d


def place(d: Dispatcher, rid: str = "r", prompt: int = 10) -> tuple[str, str]:
    """Both legs in one call (pd_batch): (prefill instance, decode instance)."""
    decision = d.schedule(request(rid, prompt), NOW, SchedulingMode.PD_BATCH)
    assert [p.infer_type for p in decision.placements] == [InferType.PREFILL, InferType.DECODE]
    return decision.placements[0].instance_id, decision.placements[1].instance_id


def leg(d: Dispatcher, stage: InferType, rid: str = "r", prompt: int = 10) -> str:
    """One leg (pd_staged)."""
    decision = d.schedule(request(rid, prompt), NOW, SchedulingMode.PD_STAGED, stage)
    assert decision.instance_id is not None
    return decision.instance_id


def request(rid: str, prompt: int) -> Request:
    return Request(request_id=rid, prompt_len=prompt, output_len=50)


def roles(d: Dispatcher) -> tuple[str | None, str | None]:
    """(reserved prefill, reserved decode)."""
    r = reservations_of(d)
    assert r is not None
    return r.prefill, r.decode


# ---- reservations ----------------------------------------------------------------------------

def test_reserved_decode_has_no_prefill_work_and_reserved_prefill_no_decode_work() -> None:
    d = cluster(a=loaded("a", prefill_tokens=500), b=loaded("b", decoding=3),
                c=loaded("c", prefill_tokens=100), e=loaded("e"))
    # decode: the first without prefill tokens (b); prefill: the first other without decodes (a)
    assert roles(d) == ("a", "b")


def test_without_an_idle_candidate_the_least_loaded_is_reserved() -> None:
    d = cluster(a=loaded("a", decoding=4, prefill_tokens=50),
                b=loaded("b", decoding=2, prefill_tokens=300))
    assert roles(d) == ("b", "a")  # decode: fewest prefill tokens; prefill: fewest decodes


def test_reservations_hold_until_the_instance_leaves_the_view() -> None:
    d = cluster(a=loaded("a"), b=loaded("b"), c=loaded("c"))
    assert roles(d) == ("b", "a")
    busy = status("a", ts_ms=2000, num_uncomputed_tokens_all_waiting_prefills=900)
    d.on_statuses({"a": busy}, 2.0)
    assert roles(d) == ("b", "a")  # load alone never moves a reservation
    d.on_instances({i: InstanceMetadata(instance_id=i, max_num_batched_tokens=8000)
                    for i in ("b", "c")}, 3.0)
    d.on_statuses({}, 3.0)
    assert roles(d) == ("b", "c")


def test_roles_skip_instances_without_a_status() -> None:
    roles_ = AdaptivePdRoles()
    roles_.update(state_of((meta("a"), None), (meta("b"), status("b")), (meta("c"), status("c"))))
    assert (roles_.prefill, roles_.decode) == ("c", "b")


# ---- prefill ----------------------------------------------------------------------------------

def test_prefill_never_lands_on_an_instance_with_decode_work() -> None:
    # c decodes one request and has the shortest prefill queue of all; b is the reserved decode
    d = cluster(a=loaded("a", prefill_tokens=4000), b=loaded("b"), c=loaded("c", decoding=1),
                e=loaded("e", prefill_tokens=2000))
    assert roles(d) == ("a", "b")
    assert leg(d, InferType.PREFILL) == "e"


def test_prefill_takes_the_least_predicted_ttft_but_not_the_reserved_decode() -> None:
    d = cluster(a=loaded("a"), b=loaded("b"), c=loaded("c", prefill_tokens=10))
    assert roles(d) == ("b", "a")
    assert leg(d, InferType.PREFILL) == "b"  # a ties on TTFT but is the reserved decode


def test_prefill_ties_go_to_the_reserved_prefill_instance() -> None:
    d = cluster(a=loaded("a"), b=loaded("b", decoding=1), c=loaded("c"))
    assert roles(d) == ("c", "a")
    d.on_statuses({"b": status("b", ts_ms=2000)}, 2.0)  # b's decode finished: b is idle too
    assert leg(d, InferType.PREFILL) == "c"  # b and c tie; id order alone would give b


# ---- decode -----------------------------------------------------------------------------------

def test_decode_bin_packs_onto_the_fullest_instance_under_the_tpot_limit() -> None:
    # TPOT with the request: a 20 ms (29 decoding), c 25 ms (39), e 25.5 ms (40: at the limit)
    d = cluster(a=loaded("a", decoding=29), b=loaded("b"), c=loaded("c", decoding=39),
                e=loaded("e", decoding=40), f=loaded("f"))
    assert roles(d) == ("b", "a")
    assert leg(d, InferType.DECODE, prompt=500) == "c"


def test_decode_prefers_the_reserved_decode_instance_while_it_meets_both_limits() -> None:
    d = cluster(a=loaded("a", prefill_tokens=100), b=loaded("b"), c=loaded("c", decoding=2))
    assert roles(d) == ("a", "b")
    # a tiny prompt: b (TTFT 11 ms, TPOT 5.5 ms) and c (17 ms, 6.5 ms) are under 25.5 ms
    assert leg(d, InferType.DECODE, prompt=10) == "b"
    # a longer one misses the TTFT part everywhere: the fallback bin-packs onto c
    assert leg(d, InferType.DECODE, rid="r2", prompt=500) == "c"


def test_when_no_instance_is_under_the_limit_the_lowest_tpot_converts_a_prefill_one() -> None:
    # a and b decode 45 and 41 (TPOT 28 and 26 ms with the request); p is the reserved prefill
    d = cluster(a=loaded("a", decoding=45), b=loaded("b", decoding=41),
                p=loaded("p", prefill_tokens=2000), q=loaded("q", prefill_tokens=100))
    assert roles(d) == ("p", "a")
    assert leg(d, InferType.DECODE, rid="r1", prompt=100) == "q"
    # q now has a decode in flight: no more prefills there, though its queue is shorter
    assert leg(d, InferType.PREFILL, rid="r2", prompt=100) == "p"


def test_a_converted_instance_prefills_again_once_its_decodes_are_gone() -> None:
    d = cluster(a=loaded("a", decoding=45), p=loaded("p", prefill_tokens=2000),
                q=loaded("q", prefill_tokens=100))
    assert leg(d, InferType.DECODE, rid="r1", prompt=100) == "q"
    assert leg(d, InferType.PREFILL, rid="r2", prompt=100) == "p"
    d.release("r1", NOW)
    assert leg(d, InferType.PREFILL, rid="r3", prompt=100) == "q"


def test_both_legs_in_one_call_are_labelled_prefill_then_decode() -> None:
    d = cluster(a=loaded("a"), b=loaded("b"), c=loaded("c", decoding=5))
    assert place(d, prompt=500) == ("b", "c")


# ---- configuration ---------------------------------------------------------------------------

def test_adaptive_pd_needs_the_slo_policy_and_full_mode() -> None:
    with pytest.raises(ConfigError, match="--enable-adaptive-pd needs --scheduling-policy slo"):
        make_dispatcher("load-balance", flags(), random.Random(0))
    lite = flags(enable_full_mode_scheduling=False)
    with pytest.raises(ConfigError, match="--enable-adaptive-pd needs --enable-full-mode"):
        make_dispatcher("slo", lite, random.Random(0), slo_model=model())


def test_without_adaptive_pd_the_slo_policy_keeps_its_roles() -> None:
    d = make_dispatcher("slo", flags(enable_adaptive_pd=False), random.Random(0),
                        slo_model=model())
    assert reservations_of(d) is None and not d.any_instance_any_leg


def test_the_rescheduler_adds_the_bin_packing_policies_and_shares_the_reservations() -> None:
    d = cluster(a=loaded("a"), b=loaded("b"), c=loaded("c", decoding=10),
                e=loaded("e", decoding=12), g=loaded("g", decoding=48))
    assert roles(d) == ("b", "a")
    s = flags(enable_rescheduling=True, rescheduling_policies=("neutral_failover",))
    rescheduler = make_rescheduler(s, random.Random(0), slo_model=model(),
                                   reservations=reservations_of(d))
    assert [p.name for p in rescheduler.policies] == [
        "neutral_failover", "binpacking_mitigation", "binpacking_consolidation"]
    plans = [(p.trigger, p.src, p.dst) for p in rescheduler.plan(d.state, NOW)]
    # TPOT (no request): c 10.5, e 11.5, g 29.5 ms; limit 25.5, ceil 28.5, floor 18 ms
    assert plans == [("binpacking_mitigation", "g", "e"), ("binpacking_consolidation", "c", "e")]
