"""The centralized upper bound: one node, pooled data, the federation's steps per round."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedapp.client.partition import partition_examples
from fedapp.client.round import local_data
from fedapp.config import compose_config, run_setup
from strategies.centralized import Centralized
from strategies.protocol import TrainOrder
from tests.test_strategies import MODULES, SETUP, FakeGrid, adapter, reply, task_identity  # noqa: F401


def test_one_node_trains_the_federations_steps_on_pooled_data():
    grid = FakeGrid({11: 0, 12: 1, 13: 2, 14: 3})
    strategy = Centralized(SETUP, MODULES, local_steps=12, ranks=[4], alpha_ratio=2.0,
                           fraction_train=0.5, min_train_nodes=1, min_available_nodes=4)

    msgs = list(strategy.configure_train(1, ArrayRecord(adapter(4, 9)), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, [reply(msgs[0], adapter(4, 5), 40.0)])

    config = msgs[0].content["config"]
    assert len(msgs) == 1
    assert config["pooled"] is True and config["global-mode"] == "init"
    assert config["local-steps"] == 12 * 2  # a federated round trains 2 of the 4 clients
    got = arrays.to_torch_state_dict()
    for key, value in adapter(4, 5).items():  # the global adapter is the one trained
        torch.testing.assert_close(got[key], value)


def test_the_node_is_drawn_by_the_seed_per_round():
    grid = FakeGrid({11: 0, 12: 1, 13: 2})
    strategy = Centralized(SETUP, MODULES, local_steps=1, ranks=[4], alpha_ratio=2.0,
                           min_train_nodes=3, min_available_nodes=3)

    picked = {r: strategy.sample(grid, r) for r in range(1, 9)}

    assert all(len(nodes) == 1 for nodes in picked.values())
    assert len({n[0] for n in picked.values()}) > 1
    assert picked == {r: strategy.sample(grid, r) for r in range(1, 9)}


def test_a_pooled_order_trains_on_every_partition(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAPP_CACHE", str(tmp_path / "cache"))
    partition_examples.cache_clear()
    setup = run_setup(compose_config(f"model.path={tiny_model_dir}"))
    order = TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=1, seed=0)

    own, _, _ = local_data(setup, order, 1, 3)
    pooled, _, _ = local_data(setup, TrainOrder(**{**order.__dict__, "pooled": True}), 1, 3)

    parts = [partition_examples(setup, 3, i)[0] for i in range(3)]
    assert own == parts[1]
    assert pooled == parts[0] + parts[1] + parts[2]
    assert len(pooled) > len(own)


def test_centralized_is_a_strategy_the_config_builds():
    cfg = compose_config("strategy=centralized")
    assert cfg.strategy._target_ == "strategies.Centralized"
    with pytest.raises(ValueError, match="single rank"):
        Centralized(SETUP, MODULES, local_steps=1, ranks=[2, 4], alpha_ratio=2.0)
