"""The FedSpine strategy driven with a fake grid: arms, memory feasibility, pruned replies
scattered and stacked, rewards, save/load, discarded attempts. (The client round is in
test_spine_client.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedapp.config import compose_config
from fedapp.server.loop import run_rounds
from strategies import spine_prior
from strategies.bandit import Arm
from strategies.base import config_bytes
from strategies.devices import DeviceProfile, device_profiles
from strategies.fedspine import FedSpine
from strategies.flora import FLoRA
from strategies.lora_math import LORA_A, LORA_B, join_factors, split_factors
from strategies.protocol import KEPT_IN, KEPT_OUT, PruneOrder, TrainOrder
from strategies.spine_memory import estimated_memory_mb
from tests.test_strategies import SETUP, FakeGrid, task_identity  # noqa: F401

MODULES = {"base_model.model.layer.q_proj": (6, 5), "base_model.model.layer.v_proj": (3, 5)}
Q, V = MODULES
MEMORY = {"fixed_mb": 100.0, "base_mb": 1000.0, "lora_mb_per_rank": 10.0}
BANDIT = {"prune_ratios": [0.0, 0.25, 0.5], "ranks": [2, 4], "exploration": 0.05,
          "max_rank": 4, "max_prune_ratio": 0.5}  # refinement only adds rank 3
PHONE = DeviceProfile("phone", slowdown=4.0, memory_mb=700.0, up_mbps=5.0, down_mbps=20.0)
EDGE = DeviceProfile("edge", slowdown=1.0, memory_mb=5000.0, up_mbps=100.0, down_mbps=500.0)


def spine(**kwargs) -> FedSpine:
    args = {"local_steps": 1, "alpha_ratio": 2.0, "min_available_nodes": 2, "memory": MEMORY,
            "bandit": BANDIT, "devices": [PHONE, EDGE], "prune": {"slices": 1},
            "reward_scale": "none", **kwargs}  # rewards as measured (round: test_spine_reward)
    return FedSpine(SETUP, MODULES, **args)


def kept_reply(msg: Message, rows: list[int], r: int, seed: int, **metrics) -> Message:
    """A reply that pruned q_proj to `rows` (all columns) and left v_proj whole."""
    gen = torch.Generator().manual_seed(seed)
    state = {Q + LORA_A: torch.randn(r, 5, generator=gen),
             Q + LORA_B: torch.randn(len(rows), r, generator=gen),
             V + LORA_A: torch.randn(r, 5, generator=gen),
             V + LORA_B: torch.randn(3, r, generator=gen)}
    kept = {Q + KEPT_OUT: torch.tensor(rows), Q + KEPT_IN: torch.arange(5)}
    values = {"num-examples": 10.0, "train-loss": 1.0, "train-seconds": 10.0,
              "loss-before": 2.0, "loss-after": 1.8, **metrics}
    return Message(RecordDict({"arrays": ArrayRecord(state), "kept": ArrayRecord(kept),
                               "metrics": MetricRecord(values)}), reply_to=msg), state


def first_round(strategy: FedSpine) -> tuple[dict[int, Message], dict[int, int]]:
    """Round 1's train messages and ranks by node id, for nodes 11 (phone), 12 (edge)."""
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, ArrayRecord(), ConfigRecord(), FakeGrid({11: 0, 12: 1}))}
    return messages, {n: m.content["config"]["lora-r"] for n, m in messages.items()}


def test_pruned_replies_are_scattered_and_stacked_exactly():
    strategy = spine()
    messages, ranks = first_round(strategy)
    r1, s1 = kept_reply(messages[11], [0, 2, 5], ranks[11], seed=1)
    r2, s2 = kept_reply(messages[12], [1, 2, 3, 4], ranks[12], seed=2)

    arrays, _ = strategy.aggregate_train(1, [r1, r2])

    global_ = split_factors(arrays.to_torch_state_dict())
    dense = global_[Q][1] @ global_[Q][0]  # (6, 5)
    expected = torch.zeros(6, 5)
    for state, rows in ((s1, [0, 2, 5]), (s2, [1, 2, 3, 4])):
        expected[rows] += 2.0 * 0.5 * state[Q + LORA_B] @ state[Q + LORA_A]  # scaling 2, p 1/2
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)
    # round 1 is the run's last (num_rounds=1): each device prunes to its target, the least
    # its budget needs at rank 2: phone 1 - (700 - 100 - 2·10) / 1000 = 0.42, edge 0
    assert strategy.targets == {"phone": 0.42, "edge": 0.0}
    for node, name, ratio in ((11, "partition-0", 0.42), (12, "partition-1", 0.0)):
        arm = strategy.arms[name][0]
        assert TrainOrder.from_dict(messages[node].content["config"]) == TrainOrder(
            server_round=1, lora_r=arm.rank, lora_alpha=2.0 * arm.rank, local_steps=1, seed=1,
            global_mode="frozen", prune=PruneOrder(ratio=ratio, slices=1, target=ratio))


@pytest.mark.parametrize("tamper, reason", [
    (lambda c: c["kept"].__setitem__(Q + KEPT_OUT, ArrayRecord({"x": torch.tensor([0, 9, 2])})
                                     ["x"]), "kept out indices span"),
    (lambda c: c["kept"].__delitem__(Q + KEPT_IN), "only one side"),
    (lambda c: c["kept"].__setitem__(Q + KEPT_OUT, ArrayRecord(
        {"x": torch.tensor([0, 1])})["x"]), "has shape"),
    (lambda c: c["metrics"].__delitem__("loss-before"), "loss-before"),
    (lambda c: c["metrics"].__setitem__("train-seconds", float("nan")), "train-seconds"),
])
def test_bad_pruned_replies_are_rejected_and_the_round_goes_on(tamper, reason):
    strategy = spine()
    messages, ranks = first_round(strategy)
    bad, _ = kept_reply(messages[11], [0, 2, 5], ranks[11], seed=1)
    good, state = kept_reply(messages[12], [0, 1, 2], ranks[12], seed=2)
    tamper(bad.content)

    arrays, _ = strategy.aggregate_train(1, [bad, good])

    log = strategy.round_log[1].clients
    assert reason in log["partition-0"].status and log["partition-1"].status == "ok"
    assert log["partition-0"].extra["reward"] == pytest.approx(-2.0)  # failure: -1 - λ
    a, b = split_factors(arrays.to_torch_state_dict())[Q]
    dense = b @ a
    expected = torch.zeros(6, 5)
    expected[[0, 1, 2]] = 2.0 * state[Q + LORA_B] @ state[Q + LORA_A]
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)


def test_rewards_follow_the_documented_formula():
    strategy = spine(time_weight=0.5)
    messages, ranks = first_round(strategy)
    r1, _ = kept_reply(messages[11], [0, 1, 2], ranks[11], 1, **{"train-seconds": 30.0})
    r2, _ = kept_reply(messages[12], [0, 1, 2], ranks[12], 2,
                       **{"train-seconds": 10.0, "loss-after": 1.0})

    strategy.aggregate_train(1, [r1, r2])

    log = strategy.round_log[1].clients
    t1, t2 = log["partition-0"].completion_seconds, log["partition-1"].completion_seconds
    # round 1's message also carries the run setup: traffic, but not the round's own work
    down0 = log["partition-0"].bytes_down - config_bytes(strategy.setup.to_config())
    bytes0 = log["partition-0"].bytes_up * 8 / 5e6 + down0 * 8 / 20e6
    assert t1 == pytest.approx(30.0 * 4 + bytes0)  # phone: 4x compute + its slow link
    median = (t1 + t2) / 2  # gains (2 - 1.8) / 2 and (2 - 1) / 2, times speed^λ, λ = 0.5
    assert log["partition-0"].extra["reward"] == pytest.approx(0.1 * (median / t1) ** 0.5)
    assert 0.5 * (median / t2) ** 0.5 > 1.0  # the fast edge's reward is clipped at 1
    assert log["partition-1"].extra["reward"] == 1.0
    bandit = strategy.bank["partition-1"]
    arm = strategy.arms["partition-1"][0]
    assert bandit.stats[arm].pulls == 1 and bandit.stats[arm].mean == pytest.approx(
        log["partition-1"].extra["reward"])


def play(strategy: FedSpine, rounds: int, first: int = 1) -> list[dict[str, tuple]]:
    """Run rounds with synthetic replies: loss improvement grows with rank, time with 1-ratio."""
    grid, chosen = FakeGrid({11: 0, 12: 1}), []
    for t in range(first, first + rounds):
        messages = list(strategy.configure_train(t, ArrayRecord(), ConfigRecord(), grid))
        replies = []
        for msg in messages:
            cfg = msg.content["config"]
            rows = list(range(6 - round(6 * cfg["prune-ratio"])))
            replies.append(kept_reply(msg, rows, cfg["lora-r"], t, **{
                "train-seconds": 10.0 * (1 - cfg["prune-ratio"]),
                "loss-after": 2.0 - 0.02 * cfg["lora-r"]})[0])
        strategy.aggregate_train(t, replies)
        chosen.append({n: (a.prune_ratio, a.rank, o.prune.ratio)
                       for n, (a, _, o) in strategy.arms.items()})
    return chosen


@pytest.mark.parametrize("policy", ["bandit", "random"])
def test_memory_infeasible_arms_are_never_assigned(policy):
    strategy = spine(arm_policy=policy)
    chosen = play(strategy, 30)

    phone = [c["partition-0"] for c in chosen]
    for _, rank, ratio in phone:
        assert estimated_memory_mb(ratio, rank, base_mb=1000.0, lora_mb_per_rank=10.0,
                                   activation_mb=100.0) <= PHONE.memory_mb + 1e-9
    # the phone's target, 0.42, fits ranks 2 and (refined) 1, not 4 (which needs 0.44); it
    # trains at 0.42 since round t is always the last of num_rounds=1
    assert {(rank, ratio) for _, rank, ratio in phone} <= {(1, 0.42), (2, 0.42)}
    assert {ratio for _, _, ratio in (c["partition-1"] for c in chosen)} == {0.0}
    if policy == "bandit":  # the useful rank wins on the unconstrained edge client
        late = [c["partition-1"][1] for c in chosen[-10:]]
        assert max(set(late), key=late.count) == 4


def test_random_policy_is_seeded_and_feasible():
    chosen = play(spine(arm_policy="random"), 6)

    assert chosen == play(spine(arm_policy="random"), 6)
    assert {c["partition-0"][1] for c in chosen} == {2}  # the phone: of the grid, rank 2
    assert len({c["partition-1"] for c in chosen}) > 1  # the edge: either rank (its target is 0: one ratio)


def test_bandit_state_survives_a_checkpoint():
    straight = spine()
    play(straight, 12)
    first = spine()
    play(first, 7)
    resumed = spine()
    resumed.load_state(first.state_dict(), ArrayRecord(join_factors(first.global_factors)))

    assert play(resumed, 5, first=8) == play(first, 5, first=8)
    assert resumed.bank.state_dict() == straight.bank.state_dict()


def test_a_device_that_fits_no_arm_is_refused_before_training():
    tiny = DeviceProfile("watch", memory_mb=150.0)
    with pytest.raises(ValueError, match="watch: memory_mb=150 fits no arm: even pruned "
                                         "to max_prune_ratio=0.5 at rank 2"):
        spine(devices=[tiny, EDGE])


def test_scenario_devices_are_checked():
    with pytest.raises(ValueError, match=r"device_of_client names \['tablet'\]"):
        device_profiles({"phone": {"slowdown": 2}}, ["phone", "tablet"], 20, 100)
    with pytest.raises(ValueError, match="devices.phone.slowdown=-1.0"):
        device_profiles({"phone": {"slowdown": -1}}, ["phone"], 20, 100)
    with pytest.raises(ValueError, match="strategy.arm_policy='greedy'"):
        compose_config("strategy=fedspine strategy.arm_policy=greedy")
    with pytest.raises(ValueError, match="strategy.memory"):
        compose_config("strategy=fedspine ~strategy.memory.fixed_mb")
    with pytest.raises(ValueError, match=r"strategy.bandit has unknown keys \['arms'\]"):
        compose_config("strategy=fedspine +strategy.bandit.arms=3")
    with pytest.raises(ValueError, match="strategy.bandit.exploration=-1"):
        compose_config("strategy=fedspine strategy.bandit.exploration=-1")
    with pytest.raises(ValueError, match="strategy.prune.slices=13; allowed: at most "
                                         "train.local_steps=12"):
        compose_config("strategy=fedspine strategy.prune.slices=13")
    with pytest.raises(ValueError, match="devices.phone.slowdown='fast'"):
        device_profiles({"phone": {"slowdown": "fast"}}, ["phone"], 20, 100)
    profiles = device_profiles(None, [], 20, 100)
    assert profiles == [DeviceProfile("default", up_mbps=20, down_mbps=100)]
    assert profiles[0].completion_seconds(3.0, 2.5e6, 25e6) == pytest.approx(3 + 1 + 2)


def test_a_round_where_nobody_pruned_is_exactly_floras_stack():
    strategy = spine()
    messages, ranks = first_round(strategy)
    replies = []
    for i, node in enumerate((11, 12)):
        rep, _ = kept_reply(messages[node], list(range(6)), ranks[node], i)
        del rep.content["kept"]
        replies.append(rep)
    # FLoRA holds its global at wire precision, FedSpine in fp32: compare at fp32
    flora = FLoRA(dataclasses.replace(SETUP, wire_dtype="float32"), MODULES, local_steps=1,
                  ranks=[ranks[11], ranks[12]], alpha_ratio=2.0, min_available_nodes=2)
    sent = {m.metadata.dst_node_id: m for m in flora.configure_train(
        1, ArrayRecord(), ConfigRecord(), FakeGrid({11: 0, 12: 1}))}
    flora_replies = [Message(r.content, reply_to=sent[n]) for r, n in zip(replies, (11, 12),
                                                                        strict=True)]

    got = split_factors(strategy.aggregate_train(1, replies)[0].to_torch_state_dict())
    expected = split_factors(flora.aggregate_train(1, flora_replies)[0].to_torch_state_dict())

    for key in MODULES:
        torch.testing.assert_close(got[key][1] @ got[key][0],
                                   expected[key][1] @ expected[key][0])


def test_a_dropped_module_contributes_zero_and_the_rest_is_stacked():
    strategy = spine()
    messages, ranks = first_round(strategy)
    rep, state = kept_reply(messages[11], [0, 2, 5], ranks[11], seed=1)
    arrays = rep.content["arrays"]
    del arrays[V + LORA_A], arrays[V + LORA_B]  # v_proj's block was dropped (LLM-Drop)
    rep.content["kept"][V + KEPT_OUT] = ArrayRecord({"x": torch.zeros(0, dtype=torch.long)})["x"]
    rep.content["kept"][V + KEPT_IN] = ArrayRecord({"x": torch.zeros(0, dtype=torch.long)})["x"]

    new, _ = strategy.aggregate_train(1, [rep])

    assert strategy.round_log[1].clients["partition-0"].ok
    got = split_factors(new.to_torch_state_dict())
    assert torch.count_nonzero(got[V][1] @ got[V][0]) == 0
    expected = torch.zeros(6, 5)
    expected[[0, 2, 5]] = 2.0 * state[Q + LORA_B] @ state[Q + LORA_A]
    torch.testing.assert_close(got[Q][1] @ got[Q][0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("personal", [False, True])
def test_a_discarded_attempt_leaves_no_trace_in_the_stack_or_the_bandits(personal):
    """min_replies=2: attempt 1 gets one valid reply and is retried; the result must equal a
    run whose first attempt succeeded with attempt 2's replies, down to the adapter each
    device holds (and, with `personal`, its residual)."""

    class ScriptedGrid(FakeGrid):
        def __init__(self, attempts):
            super().__init__({11: 0, 12: 1})
            self.attempts = attempts

        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if messages[0].metadata.message_type != "train":
                return super().send_and_receive(messages, timeout)
            good = self.attempts.pop(0)
            return [kept_reply(m, [0, 1, 2], m.content["config"]["lora-r"], seed=n)[0]
                    for n, m in enumerate(messages) if n in good]

    def run(attempts):
        strategy = spine(prune={"slices": 1}, personal=personal)
        arrays = run_rounds(strategy, ScriptedGrid(attempts), ArrayRecord(), 1, 1, 10.0, 2, 1,
                            lambda *_: None)
        return strategy, split_factors(arrays.to_torch_state_dict())

    retried, got = run([[0], [0, 1]])
    straight, expected = run([[0, 1]])

    for key in MODULES:
        torch.testing.assert_close(got[key][1] @ got[key][0], expected[key][1] @ expected[key][0])
    assert retried.bank.state_dict() == straight.bank.state_dict()
    assert (retried.round_log[1].attempts, straight.round_log[1].attempts) == (2, 1)
    assert retried.round_log[1].to_json()["attempts"] == 2
    deployed, expected_deployed = retried.deployments(), straight.deployments()
    assert deployed.keys() == expected_deployed.keys() == {"partition-0", "partition-1"}
    for name, info in deployed.items():
        held, want = info["held"], expected_deployed[name]["held"]
        assert held.keys() == want.keys()
        for key in held:
            torch.testing.assert_close(held[key], want[key])


def test_arms_that_train_alike_are_one_arm_and_unplayed_arms_get_a_prior():
    # Prepare: one round; the phone's target and need at rank 2 are 0.42, the edge's target 0
    strategy = spine()
    play(strategy, 1)
    phone, edge = (strategy.arms[n][1] for n in ("partition-0", "partition-1"))

    # Assert: the phone's three ratios at rank 2 all train at 0.42 (rank 4 does not fit);
    # the edge's ratios all train at 0
    grid = strategy.bank["partition-0"].arms
    assert [a for a in grid if strategy.feasible_for(phone, grid)(a)] == [Arm(0.0, 2)]
    assert [a for a in grid if strategy.feasible_for(edge, grid)(a)] == [Arm(0.0, 2),
                                                                         Arm(0.0, 4)]
    # the edge played (0, 4), the largest rank; rank 2, though half the upload, is predicted
    # at (0, 4)'s mean reward (the prior is neutral in rank: test_spine_prior)
    edge_log, played = strategy.round_log[1].clients["partition-1"], strategy.arms["partition-1"][0]
    assert played == Arm(0.0, 4)
    up = edge_log.bytes_up * 8 / (EDGE.up_mbps * 1e6)  # seconds at rank 4
    down = edge_log.bytes_down * 8 / (EDGE.down_mbps * 1e6)  # the run setup included
    work = config_bytes(strategy.setup.to_config()) * 8 / (EDGE.down_mbps * 1e6)
    assert edge_log.completion_seconds == pytest.approx(10.0 + up + down - work)
    mean = strategy.bank["partition-1"].stats[played].mean
    assert mean > 0 and up > 0
    assert strategy.prior_for(2, edge)(Arm(0.0, 2)) == pytest.approx(mean, rel=1e-9)
    # nothing measured yet: the edge (target 0) owes nothing on any arm
    assert spine().prior_for(1, edge)(Arm(0.0, 4)) == 0.0


def test_a_device_starts_on_the_path_that_reaches_its_target(monkeypatch):
    # the phone must end at 0.5; its budget alone needs 0.42 at rank 2. The grid's first arm
    # (0.0, r2) would train at 0.42 and owe a second pruning round: the prior charges it
    # λ, so round 1 plays an arm at 0.5, with the largest rank that fits (100 + 1000·0.5 +
    # 10·4 = 640 MB of 700), and the phone is at its target from round 1 on
    phone = dataclasses.replace(PHONE, sparsity=0.5)
    strategy = spine(devices=[phone, EDGE], num_rounds=5)
    chosen = play(strategy, 1)
    assert chosen[0]["partition-0"] == (0.5, 4, 0.5)
    assert chosen[0]["partition-1"] == (0.0, 4, 0.0)  # the edge's target is 0: largest rank
    # without a prior (prior_pulls 0) the grid's first arm: the old two-round path
    plain = spine(devices=[phone, EDGE], num_rounds=5, bandit={**BANDIT, "prior_pulls": 0})
    assert play(plain, 1)[0]["partition-0"] == (0.0, 2, pytest.approx(0.42, abs=0.01))
    # a target beyond the grid (0.6 > its top ratio 0.5): every arm owes the last round's
    # pruning, so none is charged and the largest rank plays at the least its memory needs
    # (rank 4: 100 + 1000·(1 - p) + 40 <= 700, p = 0.44)
    beyond = spine(devices=[dataclasses.replace(PHONE, sparsity=0.6), EDGE], num_rounds=5)
    assert play(beyond, 1)[0]["partition-0"] == (0.0, 4, pytest.approx(0.44, abs=0.01))
    phone_id, unplayed = beyond.arms["partition-0"][1], Arm(0.5, 2)
    charged = beyond.prior_for(2, phone_id)(unplayed)
    monkeypatch.setattr(spine_prior, "OWED_ROUNDS", 0.0)
    assert charged == beyond.prior_for(2, phone_id)(unplayed)  # the cost model alone


def test_reward_from_pruned_measures_from_the_model_after_this_rounds_pruning():
    strategy = spine(time_weight=0.0, reward_from="pruned")
    messages, ranks = first_round(strategy)
    # pruning took the probe loss from 2.0 to 3.0; training brought it to 2.7
    replies = [kept_reply(messages[n], [0, 1, 2], ranks[n], n,
                          **{"loss-pruned": 3.0, "loss-after": 2.7})[0] for n in (11, 12)]

    strategy.aggregate_train(1, replies)

    log = strategy.round_log[1].clients
    assert log["partition-0"].extra["reward"] == pytest.approx((3.0 - 2.7) / 3.0)
    assert spine(time_weight=0.0).before_key == "loss-before"  # the default: (2.0 - 2.7) / 2


def test_a_reply_without_the_loss_the_reward_needs_is_rejected():
    strategy = spine(reward_from="pruned")
    messages, ranks = first_round(strategy)
    bad, _ = kept_reply(messages[11], [0, 1, 2], ranks[11], 1)  # no loss-pruned
    good, _ = kept_reply(messages[12], [0, 1, 2], ranks[12], 2, **{"loss-pruned": 2.5})

    strategy.aggregate_train(1, [bad, good])

    log = strategy.round_log[1].clients
    assert "metric 'loss-pruned' is None" in log["partition-0"].status
    assert log["partition-1"].status == "ok"
    with pytest.raises(ValueError, match=r"strategy.reward_from='end'; allowed: \['start', "
                                         r"'pruned'\]"):
        spine(reward_from="end")
