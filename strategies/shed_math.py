"""SHED's math (He et al., 2024: Shapley-based automated dataset refinement for instruction
fine-tuning), free of models and of Flower: which of a client's examples it keeps.

1. **Clusters.** k-means of the examples' embeddings (`kmeans`: k-means++ seeding from a
   seeded generator, then Lloyd iterations until no example changes cluster), and one
   representative per cluster: its member nearest the centroid (`representatives`).
2. **Value.** The representatives are the players of a cooperative game; v(S) is a cheap
   proxy of what training on S's representatives is worth. The client's proxy
   (`first_order_value`): the first-order reduction of its validation loss after one
   gradient step of size lr on the mean gradient of S's representatives,

       v(S) = lr · <g_val, (1/|S|) Σ_{i∈S} g_i> = lr · mean_{i∈S} a_i,   v(∅) = 0,

   with a_i = <g_val, g_i> the alignment of representative i's gradient with the
   validation gradient. A cluster's value is its representative's Shapley value

       φ_i = Σ_{S ⊆ N∖{i}} |S|! (n − |S| − 1)! / n! · (v(S ∪ {i}) − v(S)),

   enumerated exactly up to `EXACT_PLAYERS` players (`shapley_exact`), else estimated by
   the mean marginal contribution over seeded random permutations
   (`shapley_permutations`). For this v the value is affine in a_i:
   φ_i = lr · ((H_n / n) a_i − (H_n − 1) / (n (n − 1)) Σ_{j≠i} a_j) (H_n the n-th
   harmonic number), so clusters rank as their representatives' alignments do; a richer v
   (any callable over sorted player tuples) goes through the same functions.
3. **Selection.** Under a budget of `budget_count` examples, whole clusters in decreasing
   value (quality-ordered), the last one only partly, by a seeded draw within it
   (`quality_ordered`); the baseline draws the same number at random (`random_subset`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from strategies.records import require

EXACT_PLAYERS = 10  # 2^10 coalitions: exact enumeration below this, permutations above
Game = Callable[[tuple[int, ...]], float]  # v(S), S a sorted tuple of player indices


def budget_count(n: int, fraction: float) -> int:
    """Examples kept of `n` under a budget `fraction` in (0, 1]: rounded half up, >= 1."""
    return max(1, min(n, math.floor(fraction * n + 0.5)))


def check_clusters_fit(clusters: int, sizes: Mapping[int, int]) -> None:
    """Refuse more clusters than some partition has examples (partition id -> size)."""
    small = {i: n for i, n in sorted(sizes.items()) if n < clusters}
    require(not small, "train.selection_clusters", clusters,
            f"at most the examples of the smallest partition (partition id: examples "
            f"{small}); fewer clusters or fewer clients (train.selection=shed)")


def _kmeans_pp(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: the first centre uniformly, each next one with probability
    proportional to the squared distance to the nearest centre so far. (k,) indices."""
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = torch.cdist(points, points[chosen]).squeeze(1) ** 2  # (n,)
    for _ in range(1, k):
        weights = nearest.clone()
        weights[chosen] = 0.0
        if float(weights.sum()) <= 0.0:  # duplicates left only: any unchosen point
            weights = torch.ones(n, dtype=points.dtype)
            weights[chosen] = 0.0
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, torch.cdist(points, points[chosen[-1:]]).squeeze(1) ** 2)
    return torch.tensor(chosen)


def _fill_empty(points: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> None:
    """Give every empty cluster the point farthest from its own centroid among clusters
    with more than one member (in place): no cluster stays empty while n >= k."""
    for j in range(centroids.shape[0]):
        if bool((labels == j).any()):
            continue
        counts = torch.bincount(labels, minlength=centroids.shape[0])
        spread = (points - centroids[labels]).norm(dim=1)  # (n,)
        spread[counts[labels] <= 1] = -1.0
        far = int(spread.argmax())
        labels[far] = j
        centroids[j] = points[far]


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator,
           iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (k, d), labels (n,)) of k-means on `points` (n, d), n >= k, in float64:
    k-means++ seeding from `generator`, then Lloyd steps until the labels stop changing (at
    most `iterations`). Deterministic for a given generator state."""
    n = points.shape[0]
    require(1 <= k <= n, "train.selection_clusters", k, f"1 <= clusters <= {n} examples")
    x = points.double()
    centroids = x[_kmeans_pp(x, k, generator)].clone()  # (k, d)
    labels = torch.cdist(x, centroids).argmin(dim=1)  # (n,)
    for _ in range(iterations):
        _fill_empty(x, centroids, labels)
        centroids = _means(x, labels, k)
        new = torch.cdist(x, centroids).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
    _fill_empty(x, centroids, labels)  # a no-op once converged
    return _means(x, labels, k), labels


def _means(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(k, d) mean of each cluster's points (every cluster has one)."""
    return torch.stack([points[labels == j].mean(dim=0) for j in range(k)])


def representatives(points: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor,
                    avoid: torch.Tensor | None = None) -> list[int]:
    """Per cluster, the index of its member nearest its centroid, preferring members not
    in `avoid` (indices, e.g. the validation slice); ties to the lower index."""
    distance = (points.double() - centroids[labels]).norm(dim=1)  # (n,)
    if avoid is not None and len(avoid):
        distance[avoid] += distance.max() + 1.0  # an avoided member only if nothing else
    out = []
    for j in range(centroids.shape[0]):
        members = torch.nonzero(labels == j).squeeze(1)
        out.append(int(members[distance[members].argmin()]))
    return out


def first_order_value(alignment: Sequence[float], lr: float) -> Game:
    """v(S) = lr · mean_{i∈S} alignment[i] (0 for the empty coalition): the first-order
    loss reduction on the validation slice after a step of size lr on S's mean gradient."""
    values = [float(a) for a in alignment]
    return lambda players: lr * sum(values[i] for i in players) / len(players) if players \
        else 0.0


def shapley_exact(value: Game, n: int) -> list[float]:
    """Every player's Shapley value, by enumerating all 2^n coalitions (v called once each)."""
    worth = {s: value(s) for size in range(n + 1) for s in itertools.combinations(range(n), size)}
    weight = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    phi = [0.0] * n
    for coalition, v in worth.items():
        for i in set(range(n)) - set(coalition):
            joined = tuple(sorted((*coalition, i)))
            phi[i] += weight[len(coalition)] * (worth[joined] - v)
    return phi


def shapley_permutations(value: Game, n: int, permutations: int,
                         generator: torch.Generator) -> list[float]:
    """Monte Carlo Shapley values: each player's mean marginal contribution v(S ∪ {i}) −
    v(S) over `permutations` random orders drawn from `generator` (S: the players before i)."""
    phi = [0.0] * n
    for _ in range(permutations):
        order = torch.randperm(n, generator=generator).tolist()
        before, worth = (), value(())
        for i in order:
            joined = tuple(sorted((*before, i)))
            now = value(joined)
            phi[i] += now - worth
            before, worth = joined, now
    return [p / permutations for p in phi]


def shapley_values(value: Game, n: int, permutations: int,
                   generator: torch.Generator) -> list[float]:
    """Exact up to `EXACT_PLAYERS` players, else Monte Carlo over `permutations` orders."""
    if n <= EXACT_PLAYERS:
        return shapley_exact(value, n)
    return shapley_permutations(value, n, permutations, generator)


def quality_ordered(labels: torch.Tensor, values: Sequence[float], count: int,
                    generator: torch.Generator) -> list[int]:
    """`count` example indices: whole clusters in decreasing value (ties: lower cluster
    first), then a seeded random part of the cluster that no longer fits whole. Sorted."""
    kept: list[int] = []
    for j in sorted(range(len(values)), key=lambda c: -values[c]):
        members = torch.nonzero(labels == j).squeeze(1)
        room = count - len(kept)
        if len(members) > room:
            draw = torch.randperm(len(members), generator=generator)[:room]
            kept += members[draw].tolist()
            break
        kept += members.tolist()
    return sorted(kept)


def random_subset(n: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` of range(n) drawn uniformly without replacement from `generator`. Sorted."""
    return sorted(torch.randperm(n, generator=generator)[:count].tolist())
