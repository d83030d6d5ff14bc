"""SHED's math against hand-computed values: k-means, Shapley values, budget selection."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from strategies.shed_math import (
    EXACT_PLAYERS,
    budget_count,
    check_clusters_fit,
    first_order_value,
    kmeans,
    quality_ordered,
    random_subset,
    representatives,
    shapley_exact,
    shapley_permutations,
    shapley_values,
)

# two groups of three points, far apart
POINTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0],
                       [10.0, 10.0], [10.0, 11.0], [11.0, 10.0]])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def glove(players: tuple[int, ...]) -> float:
    """Player 0 holds a left glove, players 1 and 2 a right one: a pair is worth 1."""
    return 1.0 if 0 in players and (1 in players or 2 in players) else 0.0


def test_kmeans_finds_the_two_groups_and_their_means():
    for seed in range(5):
        # Execute
        centroids, labels = kmeans(POINTS, 2, gen(seed))

        # Assert: whatever the seeding, the groups and their means (1/3, 1/3), (31/3, 31/3)
        assert labels[0] == labels[1] == labels[2] != labels[3] == labels[4] == labels[5]
        low = int(labels[0])
        torch.testing.assert_close(centroids[low], torch.tensor([1 / 3, 1 / 3]).double())
        torch.testing.assert_close(centroids[1 - low], torch.tensor([31 / 3, 31 / 3]).double())


def test_kmeans_lloyd_moves_a_point_to_its_nearer_mean():
    # Prepare: on a line, 0, 1, 2 and 10, 11; any seeding of 2 centres ends at {0,1,2}, {10,11}
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])

    # Execute
    centroids, labels = kmeans(points, 2, gen(3))

    # Assert
    assert sorted(centroids.squeeze(1).tolist()) == [1.0, 10.5]
    assert labels.tolist()[:3] == [labels[0]] * 3 and labels[3] == labels[4] != labels[0]


def test_kmeans_keeps_every_cluster_non_empty_even_on_duplicates():
    # Prepare: 4 points, two of them twice: 3 clusters need a duplicate alone in one
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0]])

    # Execute
    _, labels = kmeans(points, 3, gen(1))

    # Assert
    assert sorted(torch.bincount(labels, minlength=3).tolist()) == [1, 1, 2]


def test_kmeans_is_deterministic_per_seed():
    points = torch.randn(40, 5, generator=gen(7))

    # Execute
    first, second, other = kmeans(points, 4, gen(1)), kmeans(points, 4, gen(1)), \
        kmeans(points, 4, gen(2))

    # Assert
    assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])
    assert other[1].shape == first[1].shape
    with pytest.raises(ValueError, match="train.selection_clusters=41"):
        kmeans(points, 41, gen(1))


def test_representatives_are_the_members_nearest_their_centroid():
    # Prepare
    centroids, labels = kmeans(POINTS, 2, gen(0))

    # Execute
    reps = representatives(POINTS, centroids, labels)
    avoided = representatives(POINTS, centroids, labels, avoid=torch.tensor([0, 3]))

    # Assert: (0,0) is nearest (1/3, 1/3) (distance 0.47, the others 0.75), (10,10) likewise
    assert sorted(reps) == [0, 3]
    low, high = sorted(avoided)  # the avoided ones skipped: the two at 0.75 are as near
    assert low in (1, 2) and high in (4, 5)


def test_shapley_of_two_players_by_hand():
    # Prepare: v({}) = 0, v({0}) = 1, v({1}) = 2, v({0, 1}) = 5
    worth = {(): 0.0, (0,): 1.0, (1,): 2.0, (0, 1): 5.0}

    # Execute
    phi = shapley_exact(worth.__getitem__, 2)

    # Assert: φ0 = ½(1 − 0) + ½(5 − 2) = 2, φ1 = ½(2 − 0) + ½(5 − 1) = 3
    assert phi == pytest.approx([2.0, 3.0])


def test_shapley_of_the_glove_game_exact_and_by_permutations():
    # Execute
    exact = shapley_exact(glove, 3)
    sampled = shapley_permutations(glove, 3, 3000, gen(0))

    # Assert: player 0 is pivotal in 4 of the 6 orders, players 1 and 2 in one each
    assert exact == pytest.approx([2 / 3, 1 / 6, 1 / 6])
    assert sampled == pytest.approx(exact, abs=0.03)
    assert sum(sampled) == pytest.approx(1.0)  # every permutation's marginals sum to v(N)


def test_an_additive_game_gives_each_player_its_own_contribution():
    # Prepare: v(S) = Σ_{i∈S} w_i
    w = [0.5, -1.0, 2.0, 3.5]

    def additive(players: tuple[int, ...]) -> float:
        return sum(w[i] for i in players)

    # Execute / Assert: every marginal contribution is w_i, exactly and in every sample
    assert shapley_exact(additive, 4) == pytest.approx(w)
    assert shapley_permutations(additive, 4, 7, gen(5)) == pytest.approx(w)


def test_the_first_order_game_by_hand_and_in_closed_form():
    # Prepare: two players with alignments 4 and 2, lr 1: v({0}) = 4, v({1}) = 2,
    # v({0, 1}) = 3 (the mean)
    value = first_order_value([4.0, 2.0], lr=1.0)

    # Execute
    phi = shapley_exact(value, 2)

    # Assert: φ0 = ½·4 + ½(3 − 2) = 2.5, φ1 = ½·2 + ½(3 − 4) = 0.5
    assert value(()) == 0.0 and value((0, 1)) == 3.0
    assert phi == pytest.approx([2.5, 0.5])
    # n = 5: φ_i = lr·(H_n/n · a_i − (H_n − 1)/(n(n − 1)) · Σ_{j≠i} a_j)
    a, lr, n = [0.3, -1.2, 2.0, 0.7, 0.1], 0.01, 5
    harmonic = sum(1 / k for k in range(1, n + 1))
    closed = [lr * (harmonic / n * a[i] - (harmonic - 1) / (n * (n - 1)) * (sum(a) - a[i]))
              for i in range(n)]
    assert shapley_exact(first_order_value(a, lr), n) == pytest.approx(closed)


def test_exact_below_the_player_limit_sampled_above():
    calls: list[tuple[int, ...]] = []

    def counted(players: tuple[int, ...]) -> float:
        calls.append(players)
        return float(len(players))

    # Execute
    shapley_values(counted, EXACT_PLAYERS, 5, gen(0))
    exact_calls = len(calls)
    calls.clear()
    values = shapley_values(counted, EXACT_PLAYERS + 1, 5, gen(0))

    # Assert: 2^n coalitions once each, then n + 1 values per permutation
    assert exact_calls == 2 ** EXACT_PLAYERS
    assert len(calls) == 5 * (EXACT_PLAYERS + 2) and values == pytest.approx([1.0] * 11)


def test_permutation_estimates_are_deterministic_per_seed():
    a = shapley_permutations(glove, 3, 10, gen(4))
    assert a == shapley_permutations(glove, 3, 10, gen(4))
    assert a != shapley_permutations(glove, 3, 10, gen(5))


def test_budget_counts_round_half_up_and_keep_at_least_one():
    assert [budget_count(113, f) for f in (1.0, 0.5, 0.25)] == [113, 57, 28]  # 56.5, 28.25
    assert budget_count(10, 0.01) == 1 and budget_count(3, 1) == 3


def test_quality_ordered_takes_whole_clusters_by_value_then_part_of_the_next():
    # Prepare: clusters 0 = {0, 1}, 1 = {2, 3, 4}, 2 = {5}; values order them 1, 2, 0
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    values = [0.5, 2.0, 1.0]

    # Execute
    exact_fit = quality_ordered(labels, values, 4, gen(0))
    partial = quality_ordered(labels, values, 5, gen(0))
    first_only = quality_ordered(labels, values, 2, gen(0))

    # Assert
    assert exact_fit == [2, 3, 4, 5]
    assert len(partial) == 5 and set(partial) - {2, 3, 4, 5} <= {0, 1}
    assert len(first_only) == 2 and set(first_only) <= {2, 3, 4}
    assert partial == quality_ordered(labels, values, 5, gen(0))  # seeded
    # equal values: the lower cluster first
    assert quality_ordered(labels, [1.0, 1.0, 1.0], 2, gen(0)) == [0, 1]


def test_random_subset_counts_and_seeds():
    picks = random_subset(20, 5, gen(2))
    assert len(set(picks)) == 5 and all(0 <= i < 20 for i in picks) and picks == sorted(picks)
    assert picks == random_subset(20, 5, gen(2))
    draws = {tuple(random_subset(20, 5, gen(s))) for s in range(10)}
    assert len(draws) > 1


def test_clusters_beyond_a_partition_are_refused_naming_it():
    check_clusters_fit(3, {0: 3, 1: 10})  # fits
    with pytest.raises(ValueError, match=r"train.selection_clusters=4; allowed: .*\{0: 3\}"):
        check_clusters_fit(4, {0: 3, 1: 10})


def test_shapley_efficiency_on_a_random_game():
    # Prepare: any game: the values add up to v(N) − v(∅)
    worth = {s: float(torch.rand(1, generator=gen(len(s) * 31 + sum(s))))
             for k in range(5) for s in itertools.combinations(range(4), k)}
    worth[()] = 0.0

    # Execute
    phi = shapley_exact(worth.__getitem__, 4)

    # Assert
    assert math.isclose(sum(phi), worth[(0, 1, 2, 3)], rel_tol=1e-12)
