"""Which arms a FedSpine device may play: arms that would train the same model are one."""

from __future__ import annotations

import dataclasses

from strategies.bandit import Arm
from strategies.base import ClientIdentity
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
