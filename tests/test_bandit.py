"""Tests of FedSpine's per-client bandit, its reward and its memory model
(strategies/bandit.py), and of the heterogeneous-device scenario it will be fed from."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from strategies.bandit import (
    Arm,
    BanditBank,
    BanditConfig,
    ClientBandit,
)
from strategies.spine_memory import estimated_memory_mb, memory_feasible
from strategies.spine_reward import reward

BEST = Arm(0.25, 8)


def noisy_reward(arm: Arm, rng: random.Random) -> float:
    """A stationary synthetic reward: BEST earns 0.8 on average, every other arm 0.3."""
    return rng.gauss(0.8 if arm == BEST else 0.3, 0.1)


def play(bandit: ClientBandit, rounds: range, rng: random.Random,
         feasible=None) -> list[Arm]:
    picks = []
    for t in rounds:
        arm = bandit.select(feasible)
        bandit.update(arm, noisy_reward(arm, rng))
        bandit.refine(feasible)
        picks.append(arm)
    return picks


# ---------------------------------------------------------------------------------------
# Learning


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selections_concentrate_on_the_best_arm_and_refine_around_it(seed):
    bandit = ClientBandit()

    picks = play(bandit, range(1, 301), random.Random(seed))

    share = sum(arm == BEST for arm in picks[-100:]) / 100
    assert share >= 0.7, f"best arm got {share:.0%} of the last 100 pulls"
    assert picks[:9] == [Arm(p, r) for p in (0.0, 0.25, 0.5) for r in (4, 8, 16)]  # grid order
    added = set(bandit.arms) - set(picks[:9])
    # midpoints towards the neighbouring ratios (0, 0.5) and ranks (4, 16) of the best arm
    assert added == {Arm(0.125, 8), Arm(0.375, 8), Arm(0.25, 6), Arm(0.25, 12)}
    assert bandit.stats[BEST].refined and bandit.best() == BEST


def test_refine_waits_for_enough_pulls_and_respects_the_size_cap():
    bandit = ClientBandit(BanditConfig(prune_ratios=(0.5,), ranks=(16,), refine_after=3,
                                       max_arms=3, max_rank=16, max_prune_ratio=0.9))
    arm = Arm(0.5, 16)
    for _ in range(2):
        bandit.update(arm, 1.0)
    assert bandit.refine() == []  # only 2 pulls

    bandit.update(arm, 1.0)
    added = bandit.refine()

    # beyond the grid: towards 0 (0.25) and max_prune_ratio (0.7); rank 12 (towards 16 // 2)
    # would come next, but the grid is capped at 3 arms
    assert added == [Arm(0.25, 16), Arm(0.7, 16)]
    assert len(bandit.arms) == 3 and bandit.refine() == []


def test_smoothed_mean_follows_a_changed_reward():
    bandit = ClientBandit(BanditConfig(smoothing=0.5))
    arm = Arm(0.0, 4)
    bandit.update(arm, 1.0)
    bandit.update(arm, 0.0)  # step max(1/2, 0.5): the plain average so far
    assert bandit.stats[arm].mean == pytest.approx(0.5)

    bandit.update(arm, 0.0)  # step max(1/3, 0.5) = 0.5: smoothed, not averaged (1/3)
    assert bandit.stats[arm].mean == pytest.approx(0.25)


def test_ucb_score_matches_the_formula():
    bandit = ClientBandit(BanditConfig(exploration=0.3, smoothing=0.0))
    arm = Arm(0.5, 16)
    for value in (0.2, 0.4, 0.6, 0.8):
        bandit.update(arm, value)

    # N = 4 pulls in all: ln(max(4, e)) = ln 4
    assert bandit.scores()[arm] == pytest.approx(0.5 + 0.3 * math.sqrt(math.log(4) / 4))
    other = Arm(0.0, 4)
    bandit.update(other, 0.1)  # N = 5; the new arm: one pull
    assert bandit.scores()[arm] == pytest.approx(0.5 + 0.3 * math.sqrt(math.log(5) / 4))
    assert bandit.scores()[other] == pytest.approx(0.1 + 0.3 * math.sqrt(math.log(5) / 1))
    fresh = ClientBandit(BanditConfig(exploration=0.3, smoothing=0.0))
    fresh.update(arm, 0.5)  # N = 1 < e: ln(max(N, e)) = 1
    assert fresh.scores()[arm] == pytest.approx(0.5 + 0.3)


def test_a_dominated_arm_is_not_played_again():
    # Prepare: two arms, 2 pulls each; A's lower bound beats B's upper bound
    bandit = ClientBandit(BanditConfig(prune_ratios=(0.0,), ranks=(4, 8), exploration=0.1,
                                       smoothing=0.0))
    a, b = Arm(0.0, 4), Arm(0.0, 8)
    for value in (0.9, 0.9):
        bandit.update(a, value)
    for value in (0.1, 0.1):
        bandit.update(b, value)

    # Execute / Assert: ln 4 = 1.386, bonus 0.1·sqrt(1.386 / 2) = 0.083 for both:
    # LCB(A) = 0.817 > UCB(B) = 0.183
    assert bandit.dominated([a, b]) == {b}
    assert bandit.select() == a
    assert bandit.select(lambda arm: arm == b) == b  # alone, it is not dominated


def test_with_a_prior_an_unplayed_arm_competes_instead_of_going_first():
    # Prepare: three arms of rank 4, 8, 16; rank 4 played once with reward 0.5 (N = 1)
    bandit = ClientBandit(BanditConfig(prune_ratios=(0.0,), ranks=(4, 8, 16), exploration=0.1,
                                       smoothing=0.0, prior_pulls=4.0))
    a, b, c = bandit.arms
    bandit.update(a, 0.5)
    prior = {b: 0.3, c: 0.6}.get

    # Execute / Assert: UCB(a) = 0.5 + 0.1·sqrt(1 / 1) = 0.6; the unplayed get the bonus of
    # 4 pulls, 0.1·sqrt(1 / 4) = 0.05: b 0.35, c 0.65 -> c; without c, a (0.6 > 0.35)
    assert bandit.select() == b  # no prior: the first unplayed arm in grid order
    assert bandit.select(prior=prior) == c
    assert bandit.select(lambda arm: arm != c, prior) == a
    off = ClientBandit(dataclasses.replace(bandit.config, prior_pulls=0.0))
    off.update(a, 0.5)
    assert off.select(prior=prior) == b  # prior_pulls 0: the prior is not used


def test_equal_scores_go_to_the_larger_rank():
    bandit = ClientBandit(BanditConfig(prune_ratios=(0.0, 0.5), ranks=(4, 8, 16),
                                       smoothing=0.0))
    # nothing measured, one prior for all: the largest rank (grid order would give (0, 4))
    assert bandit.select(prior=lambda arm: 0.0) == Arm(0.0, 16)
    # the memory allows rank 8 at most, and ratio 0.5 is charged: (0.5, 8), not (0.5, 4)
    assert bandit.select(lambda arm: arm.rank <= 8,
                         lambda arm: 0.0 if arm.prune_ratio == 0.5 else -1.0) == Arm(0.5, 8)
    # a higher score still wins over a larger rank
    assert bandit.select(prior=lambda arm: 0.1 if arm.rank == 4 else 0.0) == Arm(0.0, 4)


# ---------------------------------------------------------------------------------------
# Feasibility


def test_infeasible_arms_are_never_selected():
    rng = random.Random(7)
    bandit = ClientBandit(BanditConfig(exploration=0.5))
    for t in range(1, 501):
        allowed = {a for a in bandit.arms if rng.random() < 0.4}
        if not allowed:
            continue

        arm = bandit.select(lambda a, allowed=allowed: a in allowed)

        assert arm in allowed, f"round {t}: selected infeasible {arm}"
        bandit.update(arm, noisy_reward(arm, rng))
        bandit.refine()


def test_memory_budget_excludes_the_arms_that_would_not_fit():
    fits = memory_feasible(budget_mb=1500, base_mb=2000, lora_mb_per_rank=10, activation_mb=200)
    bandit = ClientBandit()

    picks = play(bandit, range(1, 61), random.Random(0), feasible=fits)

    # 2000·(1 − p) + 10·r + 200 <= 1500: ratio 0.5 fits up to r = 30, 0.375 up to r = 5,
    # ratios 0 and 0.25 never; refinement adds ratios between and above them
    assert all(fits(a) for a in picks)
    assert {a.prune_ratio for a in picks[:3]} == {0.5}  # the feasible initial arms first
    assert not any(a.prune_ratio <= 0.25 for a in picks)
    assert any(not fits(a) for a in bandit.arms)  # infeasible arms were there to be picked


def test_no_feasible_arm_is_a_clear_error():
    bandit = ClientBandit()

    with pytest.raises(ValueError, match=r"no arm of the 9-arm grid is feasible .*memory budget"):
        bandit.select(lambda arm: False)


# ---------------------------------------------------------------------------------------
# Resume


def test_state_survives_json_and_the_restored_bandit_chooses_the_same():
    rng = random.Random(3)
    original = ClientBandit()
    play(original, range(1, 41), rng)

    restored = ClientBandit.from_state_dict(json.loads(json.dumps(original.state_dict())))

    assert restored.state_dict() == original.state_dict()
    rng_a, rng_b = random.Random(11), random.Random(11)
    assert play(original, range(41, 81), rng_a) == play(restored, range(41, 81), rng_b)
    assert restored.state_dict() == original.state_dict()


def test_bank_keeps_one_bandit_per_client_name_across_a_restart():
    bank = BanditBank(BanditConfig(ranks=(4, 8)))
    bank["partition-0"].update(Arm(0.0, 4), 0.5)
    bank["partition-1"].update(Arm(0.5, 8), -0.2)

    restored = BanditBank.from_state_dict(json.loads(json.dumps(bank.state_dict())))

    assert "partition-0" in restored and "partition-2" not in restored
    assert restored.config == bank.config
    assert restored["partition-1"].stats[Arm(0.5, 8)].mean == -0.2
    assert restored["partition-0"].select() == bank["partition-0"].select()
    assert len(restored["partition-2"].arms) == 6  # a new client gets the bank's grid
    with pytest.raises(ValueError, match="client name 3; allowed: a non-empty string"):
        bank[3]  # type: ignore[index]


# ---------------------------------------------------------------------------------------
# Reward and memory model


def test_reward_matches_hand_arithmetic():
    # improvement (2 − 1.5)/2 = 0.25; time 6 vs median 4: speed (4/6)^1 -> 0.25 · 2/3
    assert reward(2.0, 1.5, 6.0, [2.0, 4.0, 6.0], 1.0) == pytest.approx(0.25 * 2 / 3)
    # λ = 0.5: speed sqrt(4/6); twice as fast as the median, λ = 1: 0.25 · 2
    assert reward(2.0, 1.5, 6.0, [2.0, 4.0, 6.0], 0.5) == pytest.approx(0.25 * (2 / 3) ** 0.5)
    assert reward(2.0, 1.5, 2.0, [2.0, 4.0, 6.0], 1.0) == pytest.approx(0.5)
    # a loss that got worse is divided by the speed: slower is worse, faster less bad
    assert reward(2.0, 2.5, 6.0, [2.0, 4.0, 6.0], 1.0) == pytest.approx(-0.25 * 1.5)
    assert reward(2.0, 2.5, 2.0, [2.0, 4.0, 6.0], 1.0) == pytest.approx(-0.25 / 2)
    # a median-time client is judged on its improvement alone; λ = 0 ignores time
    assert reward(2.0, 1.0, 4.0, [4.0], 5.0) == pytest.approx(0.5)
    assert reward(2.0, 1.0, 40.0, [4.0], 0.0) == pytest.approx(0.5)
    # clipped to [-1, 1]: divergence, a fast client's large gain, a zero time
    assert reward(1.0, 9.0, 4.0, [4.0], 0.0) == -1.0
    assert reward(2.0, 1.0, 1.0, [4.0], 1.0) == 1.0
    assert reward(2.0, 1.0, 0.0, [4.0], 300.0) == 1.0
    assert reward(2.0, 2.0, 0.0, [4.0], 300.0) == 0.0
    assert reward(2.0, 3.0, 0.0, [4.0], 1.0) == pytest.approx(0.0, abs=1e-6)


def test_a_time_penalty_scales_with_the_gain():
    # the same 2x slowness costs a small gain as much, relatively, as a large one: the
    # arm order at equal time never flips as every gain shrinks over a run
    times = [2.0, 4.0, 8.0]
    for gain_after in (1.9, 1.5, 1.0):
        slow, median = reward(2.0, gain_after, 8.0, times, 1.0), reward(2.0, gain_after, 4.0,
                                                                         times, 1.0)
        assert slow == pytest.approx(median / 2)


def test_reward_rises_with_loss_improvement_and_falls_with_relative_time():
    times = [3.0, 5.0, 8.0]
    by_loss = [reward(2.0, after, 5.0, times, 1.0) for after in (2.4, 2.0, 1.8, 1.2, 0.5)]
    for gain_after in (1.5, 2.5):  # better or worse, slower is lower
        by_time = [reward(2.0, gain_after, t, times, 0.3) for t in (1.0, 3.0, 5.0, 8.0, 20.0)]
        assert by_time == sorted(by_time, reverse=True) and len(set(by_time)) == len(by_time)
    assert by_loss == sorted(by_loss) and len(set(by_loss)) == len(by_loss)


@pytest.mark.parametrize(("args", "message"), [
    ((float("nan"), 1.0, 1.0, [1.0], 0.1), "loss_before=nan; allowed: a finite loss"),
    ((1.0, 1.0, -1.0, [1.0], 0.1), "time_k=-1.0; allowed: a finite time >= 0"),
    ((1.0, 1.0, 1.0, [], 0.1), r"round_times=\[\]; allowed: a non-empty list"),
    ((1.0, 1.0, 1.0, [1.0], -0.1), "time_weight=-0.1; allowed: a finite λ >= 0"),
])
def test_reward_refuses_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        reward(*args)


def test_memory_estimate_matches_hand_arithmetic():
    # 1200·(1 − 0.25) + 12.5·16 + 300 = 900 + 200 + 300
    assert estimated_memory_mb(0.25, 16, 1200.0, 12.5, 300.0) == pytest.approx(1400.0)
    assert estimated_memory_mb(0.0, 1, 1000.0, 0.0, 0.0) == pytest.approx(1000.0)
    fits = memory_feasible(1400.0, 1200.0, 12.5, 300.0)
    assert fits(Arm(0.25, 16)) and not fits(Arm(0.25, 17))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Arm(1.0, 8), r"Arm.prune_ratio=1.0; allowed: 0 <= ratio < 1"),
    (lambda: Arm(0.5, 0), r"Arm.rank=0; allowed: an int > 0"),
    (lambda: Arm(0.5, 4.0), r"Arm.rank=4.0"),
    (lambda: BanditConfig(ranks=()), r"bandit.ranks=\(\); allowed: a non-empty list"),
    (lambda: BanditConfig(smoothing=2), r"bandit.smoothing=2; allowed: 0 <= α <= 1"),
    (lambda: BanditConfig(max_arms=4), r"bandit.max_arms=4; allowed: >= the initial grid size 9"),
    (lambda: estimated_memory_mb(0.1, 4, -5.0, 1.0, 1.0), "base_mb=-5.0"),
    (lambda: ClientBandit().update(Arm(0.9, 4), 1.0), "not in this client's grid of 9 arms"),
    (lambda: ClientBandit().update(Arm(0.0, 4), math.inf), "reward inf"),
])
def test_bad_values_are_refused_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_device_scenario_composes_with_every_client_on_a_known_device():
    from fedapp.config import compose_config

    scenario = compose_config("scenario=phones_laptops_edge").scenario

    assert scenario.num_clients == 4 and scenario.min_replies >= 1
    assert set(scenario.device_of_client) <= set(scenario.devices)
    for device in scenario.devices.values():
        assert device.slowdown >= 1 and device.memory_mb > 0
        assert device.up_mbps > 0 and device.down_mbps > 0
