"""Online mixing: the ODM policy (pure), the leader's mixer, the constructor's merge of loss
reports and the client's ``Loader.report``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zmq

from fabric_client import protocol
from fabric_client.loader import Loader
from fabricd.config import ConfigError, parse_job_spec
from fabricd.online_mixing import OnlineMixer
from fabricd.planner.online import (
    LossObservation,
    OdmState,
    exploration_rate,
    mean_losses,
    odm_round,
)
from fabricd.roles.delivery import TrainerDelivery

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

UNIFORM = [0.25, 0.25, 0.25, 0.25]


def _run(rounds: int, losses, prior=UNIFORM, alpha=0.9) -> OdmState:
    state = OdmState.start(prior)
    for _ in range(rounds):
        state = odm_round(state, losses, prior, alpha=alpha)
    return state


def test_exploration_rate_follows_the_paper():
    assert exploration_rate(0, 4) == 0.25
    assert exploration_rate(1, 4) == 0.25  # sqrt(ln 4 / 4) = 0.59 > 1/K
    assert exploration_rate(100, 4) == pytest.approx(math.sqrt(math.log(4) / 400))
    assert exploration_rate(5, 1) == 1.0


def test_a_source_whose_loss_stays_high_gains_weight():
    state = _run(40, [4.0, 2.0, 2.0, 2.0])
    assert state.weights[0] > 0.25 + 0.05
    assert state.weights[0] == max(state.weights)
    assert math.fsum(state.weights) == pytest.approx(1.0)
    assert all(w >= exploration_rate(40, 4) for w in state.weights)  # the exploration floor


def test_equal_losses_even_the_weights_out():
    # L/π rewards a source drawn less: with nothing to tell the sources apart, the bandit moves
    # from the prior towards uniform (exploration keeps part of the prior), never past it
    prior = [0.4, 0.3, 0.2, 0.1]
    state = _run(60, [2.0] * 4, prior)
    assert list(state.weights) == sorted(state.weights, reverse=True)
    assert max(state.weights) - min(state.weights) < 0.4 - 0.1
    assert all(abs(w - 0.25) < 0.05 for w in state.weights)


def test_first_rounds_are_the_prior_and_the_weights_move_only_as_exploration_falls():
    prior = [0.4, 0.3, 0.2, 0.1]
    state = odm_round(OdmState.start(prior), [9.0, 1.0, 1.0, 1.0], prior, alpha=0.5)
    assert np.allclose(state.weights, prior)  # K·ε_1 = 1: all exploration
    assert state.rewards[0] == pytest.approx(0.5 * 9.0 / 0.4)


def test_unobserved_sources_keep_their_reward_and_zero_prior_sources_stay_off():
    prior = [0.5, 0.5, 0.0]
    state = _run(30, [3.0, None, None], prior)
    assert state.weights[2] == 0.0
    assert state.rewards[1] == 0.0 and state.rewards[2] == 0.0
    assert state.weights[0] > state.weights[1]


def test_losses_are_weighted_by_the_weights_they_were_drawn_under():
    state = OdmState.start([0.5, 0.5])
    a = odm_round(state, [2.0, 2.0], [0.5, 0.5], alpha=0.5, drawn_under=[0.8, 0.2])
    assert a.rewards == (0.5 * 2.0 / 0.8, 0.5 * 2.0 / 0.2)


def test_the_policy_is_a_pure_function():
    a = _run(25, [3.0, 1.0, 2.0, 1.5])
    b = _run(25, [3.0, 1.0, 2.0, 1.5])
    assert a == b
    assert OdmState.from_record(a.to_record(), 4) == OdmState(a.rounds, a.rewards, a.weights)


@pytest.mark.parametrize("record", [
    {"rounds": -1, "rewards": [0.0], "weights": [1.0]},
    {"rounds": 1, "rewards": [0.0, 1.0], "weights": [1.0]},
    {"rounds": 1, "rewards": [float("nan")], "weights": [1.0]},
    {"rounds": 1, "rewards": [0.0], "weights": [0.0]},
])
def test_a_malformed_state_record_is_refused(record):
    with pytest.raises(ValueError):
        OdmState.from_record(record, len(record["weights"]))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        odm_round(OdmState.start(UNIFORM), [1.0] * 4, UNIFORM, alpha=1.0)
    with pytest.raises(ValueError, match="3 losses"):
        odm_round(OdmState.start(UNIFORM), [1.0] * 3, UNIFORM, alpha=0.5)
    with pytest.raises(ValueError, match="all 0"):
        odm_round(OdmState.start(UNIFORM), [1.0] * 4, [0.0] * 4, alpha=0.5)


def test_mean_losses_pools_reports_and_ignores_bad_entries():
    obs = [LossObservation(1, ((0, 6.0, 3), (1, 1.0, 1))), LossObservation(2, ((0, 2.0, 1), (5, 9.0, 1), (1, 1.0, 0)))]
    assert mean_losses(obs, 3) == [2.0, 1.0, None]


SPEC = """
[job]
name = "mix"
seed = 1
[[sources]]
name = "a"
path = "/data/a"
[[sources]]
name = "b"
path = "/data/b"
[mixture]
kind = "constant"
online = "odm"
online_every_steps = 4
online_alpha = 0.5
[[mixture.points]]
step = 0
weights = { a = 0.5, b = 0.5 }
"""


def test_job_spec_online_keys():
    spec = parse_job_spec(SPEC, "/jobs/mix.toml")
    assert spec.online.enabled and spec.online.policy == "odm"
    assert (spec.online.every_steps, spec.online.alpha, spec.online.lead_steps) == (4, 0.5, 0)
    assert not parse_job_spec(SPEC.replace('online = "odm"', ""), "/jobs/mix.toml").online.enabled
    # not part of the content fingerprint: what the policy changes is in the log
    assert spec.fingerprint({}) == parse_job_spec(SPEC.replace('online = "odm"', ""), "/jobs/mix.toml").fingerprint({})
    for bad, msg in (('online = "doremi"', "online"), ("online_alpha = 0.5", None)):
        if msg is None:
            with pytest.raises(ConfigError, match="online_alpha"):
                parse_job_spec(SPEC.replace("online_alpha = 0.5", "online_alpha = 1.0"), "/jobs/mix.toml")
        else:
            with pytest.raises(ConfigError, match=msg):
                parse_job_spec(SPEC.replace('online = "odm"', bad), "/jobs/mix.toml")


def test_mixer_rounds_only_when_due_and_moves_on():
    spec = parse_job_spec(SPEC, "/jobs/mix.toml")
    mixer = OnlineMixer(spec)
    assert not mixer.due(10)  # nothing reported yet
    assert not mixer.add(protocol.LossReport(job="mix", step=1, losses=[(2, 1.0, 1)]))
    assert mixer.counters["reports_invalid"] == 1
    for step in range(3):
        mixer.add(protocol.LossReport(job="mix", step=step, losses=[(0, 5.0, 1), (1, 1.0, 1)], reports=2))
    assert mixer.counters["reports"] == 6
    assert not mixer.due(3) and mixer.due(4)
    change = mixer.round(9, [0.5, 0.5])
    assert change.at_step == 9 and [n for n, _ in change.weights] == ["a", "b"]
    assert change.state.rewards[0] > change.state.rewards[1]
    record = mixer.change_record(change)
    assert record.origin == "online:odm" and record.points[0].step == 9 and record.points[0].weights == dict(change.weights)
    assert OdmState.from_record(record.policy, 2) == change.state
    mixer.applied(change, 4)
    assert mixer.state == change.state and not mixer.observations and mixer.next_round == 8
    resumed = OnlineMixer(spec)
    resumed.resume(change.state, 9)
    assert resumed.next_round == 13 and resumed.state == change.state


def _delivery_pair():
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return router, dealer


def test_constructor_merges_subscribed_trainers_reports():
    router, dealer = _delivery_pair()
    try:
        delivery = TrainerDelivery(router, job="mix", fingerprint="fp", ranks=[0, 1], mp_size=1)
        delivery.handle(b"t0", protocol.Subscribe(job="mix", fingerprint="fp", dp_rank=0, mp_rank=0, next_step=0,
                                                  next_micro=0, credits=2))
        delivery.handle(b"t1", protocol.Subscribe(job="mix", fingerprint="fp", dp_rank=1, mp_rank=0, next_step=0,
                                                  next_micro=0, credits=2))
        assert delivery.take_losses() is None
        delivery.handle(b"t0", protocol.LossReport(job="mix", step=3, dp_rank=0, losses=[(0, 2.0, 2), (1, 1.0, 1)]))
        delivery.handle(b"t1", protocol.LossReport(job="mix", step=4, dp_rank=1, losses=[(1, 3.0, 1)]))
        delivery.handle(b"stranger", protocol.LossReport(job="mix", step=9, dp_rank=0, losses=[(0, 99.0, 1)]))
        delivery.handle(b"t1", protocol.LossReport(job="other", step=9, dp_rank=1, losses=[(0, 99.0, 1)]))
        merged = delivery.take_losses()
        assert merged == protocol.LossReport(job="mix", step=4, reports=2, losses=[(0, 2.0, 2), (1, 4.0, 2)])
        assert delivery.take_losses() is None
        assert delivery.stats()["errors_replied"] == 2
    finally:
        router.close()
        dealer.close()


def test_loader_report_validates_and_counts_drops():
    loader = Loader("tcp://127.0.0.1:1", job="mix", dp_rank=0, dp_size=1, decode_workers=0)
    try:
        with pytest.raises(ValueError, match="known after the first batch"):
            loader.report({"a": 1.0})
        loader._session.source_names = ("a", "b")
        for bad in ({"c": 1.0}, {0: -1.0}, {0: float("nan")}, {0: (1.0, 0)}, {-1: 1.0}, {1.5: 1.0}):
            with pytest.raises(ValueError):
                loader.report(bad)
        assert loader.report({"a": 1.0, 1: (3.0, 2)}) is False  # no stream yet: dropped, counted
        assert loader.stats["loss_reports_dropped"] == 1
    finally:
        loader.close()


def test_a_new_leader_continues_the_policy_from_the_log(tmp_path):
    """The policy's state travels in the plan-change record: a leader that never saw the reports
    (a failover) starts its mixer from the newest online change in the log."""
    import msgspec

    from fabricd.cluster.records import MixturePoint, PlanChange, PolicyState
    from fabricd.cluster.telemetry import NodeTelemetry
    from fabricd.leadership import Leadership

    from .test_cluster_controller import ClusterController, _cfg

    spec = parse_job_spec(SPEC, "/jobs/mix.toml")
    cfg = _cfg(tmp_path)
    c = ClusterController(cfg, now=0.0)
    c.tick(0.0, telemetry=NodeTelemetry, roles=dict)
    c.propose([("job_submitted", {"job": "mix", "spec_toml": spec.text, "spec_origin": spec.file,
                                  "fingerprint": "", "dp_size": 1})], 0.01)
    states = [OdmState(rounds=1, rewards=(2.0, 1.0), weights=(0.5, 0.5)),
              OdmState(rounds=2, rewards=(3.0, 1.5), weights=(0.6, 0.4))]
    for at, st in zip((10, 14), states):
        change = PlanChange(job="mix", at_step=at, points=[MixturePoint(step=at, weights={"a": st.weights[0], "b": st.weights[1]})],
                            origin="online:odm", term=c.term, policy=PolicyState(**st.to_record()))
        c.propose([("plan_changed", msgspec.to_builtins(change))], 0.02)
    operator = PlanChange(job="mix", at_step=20, points=[MixturePoint(step=20, weights={"a": 1.0})],
                          origin="operator:x", term=c.term)
    c.propose([("plan_changed", msgspec.to_builtins(operator))], 0.03)

    class Runtime:  # what the mixer reads of a job runtime
        pass

    runtime = Runtime()
    runtime.spec = spec
    lead = Leadership(cfg, c, {"mix": runtime}, lambda entries, now: True)
    mixer = lead._mixer("mix", runtime)
    assert mixer.state == states[1]  # the newest online change's state, not the operator's change
    assert mixer.next_round == 14 + spec.online.every_steps
