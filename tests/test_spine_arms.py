"""Which arms a FedSpine device may play: arms that would train the same model are one."""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from fedapp.config import compose_config
from strategies.bandit import Arm, BanditConfig, ClientBandit
from strategies.base import ClientIdentity
from strategies.spine_config import bandit_config
from tests.test_bench_fedspine import bench_fedspine
from tests.test_fedspine import EDGE, PHONE, play, spine
from tests.test_strategies import task_identity  # noqa: F401


def test_once_a_device_stands_at_its_target_its_arms_differ_only_by_rank():
    # Prepare: an edge whose target is 0.25: before round 1 its ratios 0 and 0.25 (0.5 is
    # capped to 0.25) train differently; round 1 takes it to its target
    strategy = spine(devices=[PHONE, dataclasses.replace(EDGE, sparsity=0.25)])
    edge = ClientIdentity("partition-1", 1)
    grid = strategy.bank["partition-1"].arms
    assert [a for a in grid if strategy.feasible_for(edge, grid)(a)] == [
        Arm(0.0, 2), Arm(0.0, 4), Arm(0.25, 2), Arm(0.25, 4)]

    play(strategy, 1)

    # Assert: every ratio now trains at 0.25, so one arm per rank is left
    assert strategy.reached["partition-1"] == 0.25
    grid = strategy.bank["partition-1"].arms
    assert [a for a in grid if strategy.feasible_for(edge, grid)(a)] == [Arm(0.0, 2),
                                                                         Arm(0.0, 4)]


def test_the_benchs_fixed_baselines_never_grow_their_grid():
    # bench_fedspine's prune-once / fixed-arms / federate-then-prune train rank 8 throughout:
    # their bandits' grids are full, so refine adds nothing however often rank 8 wins
    methods = bench_fedspine().METHODS
    for method in ("prune-once", "fixed-arms", "federate-then-prune"):
        cfg = compose_config(f"scenario=phones_laptops_edge {methods[method]}")
        bandit = ClientBandit(bandit_config(OmegaConf.to_container(cfg.strategy.bandit)))
        for _ in range(10):
            bandit.update(bandit.select(), 0.5)
            assert bandit.refine() == []
        assert {a.rank for a in bandit.arms} == {8}, method
    # the bandit's own grid does grow: without the cap, rank 8 gets neighbours
    grown = ClientBandit(BanditConfig(prune_ratios=(0.75,), ranks=(8,)))
    for _ in range(3):
        grown.update(Arm(0.75, 8), 0.5)
    assert {a.rank for a in grown.refine()} - {8}
