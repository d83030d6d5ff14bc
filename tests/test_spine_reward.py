"""FedSpine's relative reward: each reward divided by the size of its round's gains, so that
the gains' common shrinking over a run does not decide between arms played early and late."""

from __future__ import annotations

import pytest

from strategies.spine_reward import (
    RELATIVE_CLIP,
    SCALE_FLOOR,
    failed_reward,
    reward,
    round_rewards,
)
from tests.test_fedspine import first_round, kept_reply, spine
from tests.test_strategies import task_identity  # noqa: F401


def test_relative_rewards_divide_by_the_rounds_median_gain():
    # gains (2 - 1.8)/2 = 0.1, (2 - 1)/2 = 0.5, 0; equal times, so speed 1: m = median 0.1
    results = {"a": (2.0, 1.8, 4.0), "b": (2.0, 1.0, 4.0), "c": (2.0, 2.0, 4.0)}
    assert round_rewards(results, 1.0, relative=True) == pytest.approx(
        {"a": 1.0, "b": 5.0, "c": 0.0})
    # unscaled: the rewards as `reward` gives them
    assert round_rewards(results, 1.0, relative=False) == {
        n: reward(b, a, t, [4.0] * 3, 1.0) for n, (b, a, t) in results.items()}
    # time still counts: twice the median time halves a gain (λ = 1); m is over |g|
    timed = {"a": (2.0, 1.8, 8.0), "b": (2.0, 2.2, 4.0), "c": (2.0, 1.6, 2.0)}
    assert round_rewards(timed, 1.0, relative=True) == pytest.approx(
        {"a": 0.05 / 0.1, "b": -0.1 / 0.1, "c": 0.2 * 2 / 0.1})


def test_relative_rewards_are_bounded_and_never_divide_by_a_vanishing_round():
    spike = {"a": (2.0, 1.98, 4.0), "b": (2.0, 1.98, 4.0), "c": (2.0, 1.0, 4.0)}
    assert round_rewards(spike, 0.0, relative=True)["c"] == RELATIVE_CLIP  # 0.5 / 0.01
    flat = {"a": (2.0, 2.0, 4.0), "b": (2.0, 2.0 - 2e-5, 4.0)}  # m floored: 1e-5 / 1e-3
    assert round_rewards(flat, 0.0, relative=True) == pytest.approx(
        {"a": 0.0, "b": 1e-5 / SCALE_FLOOR})
    assert round_rewards({}, 1.0, relative=True) == {}
    assert failed_reward(0.5, relative=True) == -RELATIVE_CLIP - 0.5
    assert failed_reward(0.5, relative=False) == -1.5


def test_a_round_whose_gains_all_shrink_scores_the_same_arms_the_same():
    # every device's gain 5x smaller, as late in a run: relative rewards do not move,
    # unscaled ones fall 5x, so an arm's early pulls would outrank another's late ones
    early = {"phone": (5.0, 4.5, 60.0), "laptop": (4.0, 3.8, 20.0), "edge": (3.0, 2.7, 10.0)}
    late = {n: (b, b - (b - a) / 5, t) for n, (b, a, t) in early.items()}
    assert round_rewards(late, 1.0, True) == pytest.approx(round_rewards(early, 1.0, True))
    for name, value in round_rewards(late, 1.0, False).items():
        assert value == pytest.approx(round_rewards(early, 1.0, False)[name] / 5)


def test_fedspine_learns_the_relative_reward_by_default():
    strategy = spine(reward_scale="round", time_weight=0.0)  # the config's default
    messages, ranks = first_round(strategy)
    replies = [kept_reply(messages[11], [0, 1, 2], ranks[11], 1)[0],  # gain 0.1
               kept_reply(messages[12], [0, 1, 2], ranks[12], 2, **{"loss-after": 1.0})[0]]

    strategy.aggregate_train(1, replies)

    # gains 0.1 and 0.5: m = their median 0.3
    log = strategy.round_log[1].clients
    assert log["partition-0"].extra["reward"] == pytest.approx(0.1 / 0.3)
    assert log["partition-1"].extra["reward"] == pytest.approx(0.5 / 0.3)
    arm = strategy.arms["partition-1"][0]
    assert strategy.bank["partition-1"].stats[arm].mean == pytest.approx(0.5 / 0.3)


def test_a_rejected_reply_earns_less_than_any_relative_reward():
    strategy = spine(reward_scale="round", time_weight=1.0)
    messages, ranks = first_round(strategy)
    bad, _ = kept_reply(messages[11], [0, 1, 2], ranks[11], 1)
    bad.content["metrics"]["loss-after"] = float("nan")
    good, _ = kept_reply(messages[12], [0, 1, 2], ranks[12], 2)

    strategy.aggregate_train(1, [bad, good])

    log = strategy.round_log[1].clients
    assert log["partition-1"].extra["reward"] == pytest.approx(1.0)  # alone: g / |g|
    assert log["partition-0"].extra["reward"] == -RELATIVE_CLIP - 1.0


def test_an_unknown_reward_scale_is_refused_by_name():
    with pytest.raises(ValueError, match=r"strategy.reward_scale='median'; allowed: "
                                         r"\['round', 'none'\]"):
        spine(reward_scale="median")
