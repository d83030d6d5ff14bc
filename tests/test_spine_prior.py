"""FedSpine's prior for unplayed arms: the cost model of a device's round time and the
predicted reward, against hand-computed values."""

from __future__ import annotations

import pytest

from strategies.bandit import Arm
from strategies.devices import DeviceProfile
from strategies.spine_prior import (
    OWED_ROUNDS,
    Seen,
    arm_prior,
    arm_seconds,
    first_prior,
    owed_seconds,
)

# 8 Mbit/s up, 80 Mbit/s down: 1 MB up takes 1 s, 1 MB down 0.1 s
DEVICE = DeviceProfile("phone", slowdown=2.0, up_mbps=8.0, down_mbps=80.0)
SEEN = Seen(compute_seconds=10.0, ratio=0.0, bytes_up=1e6, rank=4, bytes_down=1e6,
            median_seconds=20.0)


def test_round_time_scales_compute_by_the_pruned_share_and_bytes_by_rank():
    # unchanged arm: 2·10 + 1 + 0.1
    assert arm_seconds(SEEN, DEVICE, 0.0, 4, 0.5) == pytest.approx(21.1)
    # ratio 0.5 with κ = 0.5: f = 0.5 + 0.5·0.5 = 0.75 -> 7.5 s of compute, 15 s on the device;
    # rank 8 doubles the upload: 2 s
    assert arm_seconds(SEEN, DEVICE, 0.5, 8, 0.5) == pytest.approx(15.0 + 2.0 + 0.1)
    # κ = 1: pruning saves nothing; κ = 0: compute is proportional to what is kept
    assert arm_seconds(SEEN, DEVICE, 0.5, 4, 1.0) == pytest.approx(21.1)
    assert arm_seconds(SEEN, DEVICE, 0.5, 4, 0.0) == pytest.approx(10.0 + 1.1)
    # from a pruned round back to a less pruned arm: compute grows by f(0.25) / f(0.5)
    pruned = Seen(7.5, 0.5, 1e6, 4, 1e6, 20.0)
    assert arm_seconds(pruned, DEVICE, 0.25, 4, 0.5) == pytest.approx(
        2 * 7.5 * 0.875 / 0.75 + 1.1)


def round_seconds(arm: Arm, rank: int) -> float:
    """A round takes 16 s unpruned, 6 s at ratio 0.5, plus 1 s per unit of rank."""
    return {0.0: 16.0, 0.5: 6.0}[arm.prune_ratio] + rank


def test_prior_keeps_each_played_gain_and_rescales_it_to_the_arms_time():
    a, b, c = Arm(0.0, 4), Arm(0.0, 8), Arm(0.5, 4)
    seconds = round_seconds

    prior = arm_prior({a: 0.4, b: 0.2}, seconds, time_weight=1.0)

    # c against a at rank 4: 20 / 10 s; against b at rank 8: 24 / 14 s
    assert prior(c) == pytest.approx((0.4 * 2 + 0.2 * 24 / 14) / 2)
    # λ = 0.5: square roots of the speeds; λ = 0: the mean gain, time ignored
    assert arm_prior({a: 0.4, b: 0.2}, seconds, 0.5)(c) == pytest.approx(
        (0.4 * 2 ** 0.5 + 0.2 * (24 / 14) ** 0.5) / 2)
    assert arm_prior({a: 0.4, b: 0.2}, seconds, 0.0)(c) == pytest.approx(0.3)
    # a negative mean is divided by the speed: a faster arm is still predicted better
    assert arm_prior({a: -0.4}, seconds, 1.0)(c) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="no played arm"):
        arm_prior({}, seconds, 1.0)


def test_prior_is_neutral_in_rank():
    # rank 16 costs 12 s more than rank 4, but what it earns is unknown until it plays:
    # an unplayed rank at a played arm's ratio is predicted that arm's mean, either way
    a, b, small, large = Arm(0.0, 4), Arm(0.0, 16), Arm(0.0, 2), Arm(0.0, 32)
    seconds = round_seconds
    assert arm_prior({b: 0.5}, seconds, 1.0)(a) == pytest.approx(0.5)
    assert arm_prior({a: 0.5}, seconds, 1.0)(large) == pytest.approx(0.5)
    assert arm_prior({a: 0.5, b: 0.3}, seconds, 1.0)(small) == pytest.approx(0.4)
    # the ratio still counts, at the played arm's rank: (16 + 16) / (6 + 16)
    assert arm_prior({b: 0.5}, seconds, 1.0)(Arm(0.5, 4)) == pytest.approx(0.5 * 32 / 22)


def test_an_arm_that_stops_short_is_charged_the_round_it_owes():
    a, b = Arm(0.25, 4), Arm(0.5, 4)
    short = {a: True, b: False}.get
    assert OWED_ROUNDS == 1.0
    # nothing measured: -λ for the arm that stops short, 0 for the one that reaches
    first = first_prior(short, time_weight=1.0)
    assert first(a) == pytest.approx(-1.0) and first(b) == 0.0
    # measured: its time gets one median round (20 s) more: a 10 s arm predicted as 30 s
    owed = owed_seconds(short, median_seconds=20.0)
    assert owed(a) == 20.0 and owed(b) == 0.0
    later = arm_prior({b: 0.3}, lambda arm, rank: 10.0, 1.0, owed)
    assert later(b) == pytest.approx(0.3) and later(a) == pytest.approx(0.3 * 10 / 30)
