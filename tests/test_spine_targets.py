"""FedSpine's targets and paths on the server, with a fake grid: every device at its target
sparsity by the last round and only pruning further, federate-then-prune's schedule, the
personal residual, bad targets. (Arms, rewards and stacking: test_fedspine.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedapp.config import compose_config
from strategies.devices import DeviceProfile, device_profiles
from strategies.lora_math import LORA_A, LORA_B, join_factors, split_factors
from strategies.protocol import TrainOrder
from tests.test_fedspine import BANDIT, EDGE, PHONE, Q, first_round, kept_reply, spine
from tests.test_strategies import FakeGrid, task_identity  # noqa: F401  (an autouse fixture)


def unit_reply(msg: Message, units: dict[str, list[int]], seed: int) -> Message:
    reply, _ = kept_reply(msg, [0, 1, 2], msg.content["config"]["lora-r"], seed)
    reply.content["units"] = ArrayRecord({k: torch.tensor(v) for k, v in units.items()})
    return reply


def test_every_device_reaches_its_target_by_the_last_round_and_only_prunes_further():
    # Prepare: targets set by the user; the phone's budget needs >= 0.42 at rank 2
    phone = dataclasses.replace(PHONE, sparsity=0.5)
    edge = dataclasses.replace(EDGE, sparsity=0.25)
    strategy = spine(devices=[phone, edge], num_rounds=3, bandit={**BANDIT, "ranks": [2]})
    grid, orders, sent_units = FakeGrid({11: 0, 12: 1}), [], []

    # Execute: 3 rounds; each reply keeps fewer MLP channels of layer 0
    for t in (1, 2, 3):
        sent_g = split_factors(join_factors(strategy.global_factors))
        messages = list(strategy.configure_train(t, ArrayRecord(), ConfigRecord(), grid))
        orders.append({m.metadata.dst_node_id: TrainOrder.from_dict(m.content["config"]).prune
                       for m in messages})
        sent_units.append({m.metadata.dst_node_id: m.content.array_records.get("units")
                           for m in messages})
        strategy.aggregate_train(t, [unit_reply(m, {"0.mlp": list(range(10 - t))}, t)
                                     for m in messages])

    # Assert: ratios never go down, start at what memory needs, end at the targets
    for node, target, least in ((11, 0.5, 0.42), (12, 0.25, 0.0)):
        ratios = [o[node].ratio for o in orders]
        assert ratios == sorted(ratios) and ratios[0] >= least and ratios[-1] == target
        assert [o[node].reached for o in orders] == [0.0, *ratios[:-1]]
    phone = strategy.deployments()["partition-0"]
    held = split_factors(phone.pop("held"))
    assert phone == {
        "device": "phone", "target": 0.5, "reached": 0.5, "units": {"0.mlp": list(range(7))}}
    # what the phone holds: G of round 3 (fp16 on the wire) + its own update of
    # round 3 at full weight (scaling 2), rows 0-2 of q_proj (kept_reply) scattered
    own, _ = kept_reply(messages[0], [0, 1, 2], 2, 3)
    own_state = own.content["arrays"].to_torch_state_dict()
    expected = sent_g[Q][1].half().float() @ sent_g[Q][0].half().float()
    expected[[0, 1, 2]] += 2.0 * (own_state[Q + LORA_B].half().float()
                                  @ own_state[Q + LORA_A].half().float())
    torch.testing.assert_close(held[Q][1].float() @ held[Q][0].float(), expected, atol=2e-2,
                               rtol=1e-2)
    assert held[Q][0].shape[0] == sent_g[Q][0].shape[0] + 2
    # the structure a reply reached travels back with the next order
    assert sent_units[0][11] is None
    assert sent_units[2][11].to_torch_state_dict()["0.mlp"].tolist() == list(range(8))

    # a reply that un-prunes is rejected and the device's structure is kept
    messages = list(strategy.configure_train(4, ArrayRecord(), ConfigRecord(), grid))
    strategy.aggregate_train(4, [unit_reply(messages[0], {"0.mlp": list(range(9))}, 4)])
    assert "keeps units the device had pruned before" in \
        strategy.round_log[4].clients["partition-0"].status
    assert strategy.units["partition-0"] == {"0.mlp": list(range(7))}


def test_bad_targets_are_refused_before_training():
    with pytest.raises(ValueError, match=r"devices.phone.sparsity=0.3 is infeasible: its "
                                         r"memory_mb=700 needs at least 0.420 at rank 2; "
                                         r"allowed: a sparsity >= 0.42"):
        spine(devices=[dataclasses.replace(PHONE, sparsity=0.3), EDGE])
    with pytest.raises(ValueError, match=r"devices.phone.sparsity=1.0; allowed: a number in "
                                         r"\[0, 1\)"):
        DeviceProfile("phone", sparsity=1.0)
    with pytest.raises(ValueError, match=r"devices.phone.sparsity=-0.5; allowed"):
        device_profiles({"phone": {"sparsity": -0.5}}, ["phone"], 20, 100)
    assert device_profiles({"phone": {"sparsity": None}}, ["phone"], 20, 100)[0].sparsity \
        is None
    with pytest.raises(ValueError, match="criterion='llm-drop' drops whole blocks"):
        compose_config("strategy=fedspine strategy.prune.criterion=llm-drop")
    with pytest.raises(ValueError, match="strategy.prune.criterion='l1'"):
        compose_config("strategy=fedspine strategy.prune.criterion=l1")


def test_federate_then_prune_keeps_devices_that_cannot_hold_the_model_out_until_the_end():
    phone = dataclasses.replace(PHONE, sparsity=0.5)
    edge = dataclasses.replace(EDGE, sparsity=0.25)
    strategy = spine(devices=[phone, edge], num_rounds=3, prune_at_end=True)
    grid, asked = FakeGrid({11: 0, 12: 1}), []

    for t in (1, 2, 3):
        messages = list(strategy.configure_train(t, ArrayRecord(), ConfigRecord(), grid))
        asked.append({m.metadata.dst_node_id: TrainOrder.from_dict(m.content["config"]).prune
                      .ratio for m in messages})
        strategy.aggregate_train(t, [unit_reply(m, {}, t) for m in messages])

    # the phone (needs 0.42 at rank 2) waits; the edge trains unpruned; both prune at the end
    assert asked == [{12: 0.0}, {12: 0.0}, {11: 0.5, 12: 0.25}]
    with pytest.raises(ValueError, match="strategy.prune_at_end='yes'; allowed: true, false"):
        spine(prune_at_end="yes")


def test_personal_residual_gives_each_device_its_own_update_at_full_weight():
    # Prepare: equal weights (10 examples each), scaling 2 at rank 2
    strategy = spine(personal=True, num_rounds=2, bandit={**BANDIT, "ranks": [2]})
    messages, _ = first_round(strategy)
    r1, s1 = kept_reply(messages[11], [0, 2, 5], 2, seed=1)
    r2, s2 = kept_reply(messages[12], [1, 2, 3, 4], 2, seed=2)

    # Execute: round 1, then round 2's messages
    strategy.aggregate_train(1, [r1, r2])
    sent = {m.metadata.dst_node_id: split_factors(m.content["arrays"].to_torch_state_dict())
            for m in strategy.configure_train(2, ArrayRecord(join_factors(
                strategy.global_factors)), ConfigRecord(), FakeGrid({11: 0, 12: 1}))}

    # Assert: G = ½·2·U1 + ½·2·U2; the phone trains beside G + P = 2·U1 + 1·U2 (its own
    # update at full weight, the other's at its share), cut to the rows it kept, and
    # deploys that
    own, other = torch.zeros(6, 5), torch.zeros(6, 5)
    own[[0, 2, 5]] = s1[Q + LORA_B] @ s1[Q + LORA_A]
    other[[1, 2, 3, 4]] = s2[Q + LORA_B] @ s2[Q + LORA_A]
    g = split_factors(join_factors(strategy.global_factors))[Q]
    torch.testing.assert_close(g[1] @ g[0], own + other, atol=1e-4, rtol=1e-4)
    a, b = sent[11][Q]
    torch.testing.assert_close(b.float() @ a.float(), (2 * own + other)[[0, 2, 5]], atol=3e-2,
                               rtol=1e-2)
    held = split_factors(strategy.deployments()["partition-0"]["held"])[Q]
    torch.testing.assert_close(held[1] @ held[0], 2 * own + other, atol=1e-4, rtol=1e-4)
    assert a.shape[0] == g[0].shape[0] + 2  # G's rank + the residual's
    with pytest.raises(ValueError, match="strategy.personal=1; allowed: true, false"):
        spine(personal=1)


def test_a_checkpoint_keeps_what_each_device_holds_and_its_residual(tmp_path):
    # Prepare: one round with personal residuals, then a checkpoint written and read back
    first = spine(personal=True, num_rounds=2, bandit={**BANDIT, "ranks": [2]})
    messages, _ = first_round(first)
    first.aggregate_train(1, [kept_reply(messages[11], [0, 2, 5], 2, seed=1)[0],
                              kept_reply(messages[12], [1, 2, 3, 4], 2, seed=2)[0]])
    torch.save(first.state_dict(), tmp_path / "state.pt")
    arrays = ArrayRecord(join_factors(first.global_factors))

    # Execute: a fresh strategy restored from it
    resumed = spine(personal=True, num_rounds=2, bandit={**BANDIT, "ranks": [2]})
    resumed.load_state(torch.load(tmp_path / "state.pt", weights_only=False), arrays)

    # Assert: same deployed adapters, and round 2 sends each device the same G + P_k
    for name, info in first.deployments().items():
        got = resumed.deployments()[name]["held"]
        assert got.keys() == info["held"].keys()
        for key, value in info["held"].items():
            torch.testing.assert_close(got[key], value)
    grid = FakeGrid({11: 0, 12: 1})
    sent = [{m.metadata.dst_node_id: m.content["arrays"].to_torch_state_dict()
             for m in s.configure_train(2, arrays, ConfigRecord(), grid)}
            for s in (first, resumed)]
    for node, state in sent[0].items():
        assert state.keys() == sent[1][node].keys()
        for key, value in state.items():
            torch.testing.assert_close(sent[1][node][key], value)
