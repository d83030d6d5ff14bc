"""FedSpine's prior for the arms a device has not played: a cost model of its round time.

Without a prior a bandit plays every unplayed arm once, in grid order, before it exploits:
with a dozen arms that is the whole of a short run. With one, an unplayed arm competes with
the played ones from the start (`ClientBandit.select`), scored by its predicted reward plus
the exploration bonus of `prior_pulls` pulls, and is played only when that prediction is
competitive.

After a device's first accepted round the server knows what the round cost it (`Seen`):
compute seconds c at train ratio p, bytes up b at rank k, bytes down, and the round's median
completion time M. An arm that would train at ratio p' (the ratio FedSpine would give it
this round) with rank k' would cost

    c' = c · f(p') / f(p),   f(x) = κ + (1 − κ)(1 − x)
    b' = b · k' / k
    T' = the device's completion time for c', b' and the same bytes down

with κ = `fixed_step_share`, the part of a training step pruning does not shrink (the
embeddings, the LM head and the loss over the vocabulary: halving SmolLM2-135M's blocks made
a step only 1.28× faster, so κ ≈ 0.56). Pruning also shrinks the factors of a pruned module;
b' ignores that, so it errs towards the higher cost. The predicted reward keeps the gain
each played arm earned and rescales it to the arm's time, as the reward does
(`spine_reward.reward`: gain per unit of time, λ its exponent), both times at the played
arm's rank:

    prior(arm) = mean_j per_time(μ_j, (T'(j) / (T'(arm @ rank_j) + O(arm)))^λ)   (j: played)

so an arm whose ratio makes it twice as fast as a played one is predicted twice its reward
(λ = 1). **Rank is neutral.** The cost model knows what a rank costs (its upload) but not
what it earns (a larger adapter learns more per step), so rescaling a played gain by the
rank's time alone predicted every smaller rank better than the rank it was measured at: each
arm `refine` added below a played rank was then played for its prediction, a ratchet to the
smallest ranks (the phones of `runs/bench-fedspine-long/20261205-113720` seed 1: r16 → r4 →
r3, r6). An unplayed rank at a played arm's ratio is predicted that arm's mean; whether the
cheaper rank is worth it is what its own pulls measure.

**The path's length.** An arm that leaves its device short of its final sparsity this round
owes a later pruning round, and a pruning round costs more than a tuning round: the
loading, Taylor scores, slices and probes come on top (measured, `runs/bench-fedspine-iter/
20261204-seed0-6rounds`: a phone's second pruning round 220-228 s against its 92-119 s
rounds of tuning alone, about one median round more). O(arm) charges that now: OWED_ROUNDS
median rounds M for an arm that stops short, 0 otherwise. Charged only when some feasible
arm would reach the target this round (not before the last round of `prune_at_end`, nor
when the target lies beyond every ratio the grid offers: then every arm owes the round and
the charge would only hold back exploration). Before a device's first measured round there
is no gain to rescale: `first_prior` scores an arm that stops short −λ · OWED_ROUNDS and
the others 0, so a device starts on the prune-once path, at the largest rank its memory
allows (`ClientBandit.select` breaks ties by rank), and a shorter step or a cheaper rank is
played only when its predicted or measured reward is higher.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from strategies.bandit import Arm
from strategies.devices import DeviceProfile
from strategies.spine_reward import per_time, speed

OWED_ROUNDS = 1.0  # a later pruning round costs about one median round more (docstring)


@dataclass(frozen=True)
class Seen:
    """What a device's last accepted round cost, as the server measured it."""

    compute_seconds: float
    ratio: float  # the prune ratio it trained at
    bytes_up: float
    rank: int
    bytes_down: float
    median_seconds: float  # the round's median completion time


def arm_seconds(seen: Seen, device: DeviceProfile, ratio: float, rank: int,
                fixed_step_share: float) -> float:
    """T' of an arm training at `ratio` with `rank` on `device` (module docstring)."""
    def step(x: float) -> float:
        return fixed_step_share + (1 - fixed_step_share) * (1 - x)
    compute = seen.compute_seconds * step(ratio) / step(seen.ratio)
    return device.completion_seconds(compute, seen.bytes_up * rank / seen.rank,
                                     seen.bytes_down)


def arm_prior(means: Mapping[Arm, float], seconds: Callable[[Arm, int], float],
              time_weight: float, owed: Callable[[Arm], float] = lambda arm: 0.0
              ) -> Callable[[Arm], float]:
    """prior(arm) = mean_j per_time(μ_j, (seconds(j, r_j) / (seconds(arm, r_j) + owed(arm)))^λ)
    over the played arms j of `means`; seconds(arm, rank) is the arm's round time were it
    to train at `rank` (module docstring: rank is neutral)."""
    if not means:
        raise ValueError("arm_prior: no played arm to start from")

    def prior(arm: Arm) -> float:
        return statistics.fmean(
            per_time(mean, speed(seconds(j, j.rank), seconds(arm, j.rank) + owed(arm),
                                 time_weight)) for j, mean in means.items())
    return prior


def first_prior(short: Callable[[Arm], bool], time_weight: float) -> Callable[[Arm], float]:
    """Before a measured round: −λ · OWED_ROUNDS where short(arm) (the arm leaves its device
    short of its target this round), else 0 (module docstring)."""
    return lambda arm: -time_weight * OWED_ROUNDS if short(arm) else 0.0


def owed_seconds(short: Callable[[Arm], bool], median_seconds: float) -> Callable[[Arm], float]:
    """O(arm): OWED_ROUNDS median rounds where short(arm), else 0 (module docstring)."""
    return lambda arm: OWED_ROUNDS * median_seconds if short(arm) else 0.0
