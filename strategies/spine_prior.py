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
part of what the device earned so far and changes only the time part of the reward:

    prior(arm) = mean_j μ_j − λ · (T'(arm) − mean_j T'(j)) / M     (j: the played arms)

so a faster arm is predicted better by λ times the time it saves, in units of the median.

**The path's length.** An arm that leaves its device short of its final sparsity this round
owes a later pruning round, and a pruning round costs more than a tuning round: the
loading, Taylor scores, slices and probes come on top (measured, `runs/bench-fedspine-iter/
20261204-seed0-6rounds`: a phone's second pruning round 220-228 s against its 92-119 s
rounds of tuning alone, about one median round more). `path_prior` charges that now:

    prior(arm) = base(arm) − λ · OWED_ROUNDS · [the arm stops short of the target]

with base the prior above once the device has a measured round, 0 before; charged only
when some feasible arm would reach the target this round (not before the last round of
`prune_at_end`, nor when the target lies beyond every ratio the grid offers: then every
arm owes the round and the charge would only hold back exploration). So a device's
first round starts with an arm that reaches its target (the prune-once path, at the rank
the grid offers first), and a shorter step is played only when its measured rewards beat
that by more than the round it owes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from strategies.bandit import Arm
from strategies.devices import DeviceProfile

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


def arm_prior(means: Mapping[Arm, float], seconds: Callable[[Arm], float],
              median_seconds: float, time_weight: float) -> Callable[[Arm], float]:
    """prior(arm) = mean of `means` − λ · (seconds(arm) − mean seconds of the played) / M."""
    if not means:
        raise ValueError("arm_prior: no played arm to start from")
    mean = statistics.fmean(means.values())
    played = statistics.fmean(seconds(a) for a in means)
    scale = time_weight / max(median_seconds, 1e-8)
    return lambda arm: mean - scale * (seconds(arm) - played)


def path_prior(base: Callable[[Arm], float] | None, short: Callable[[Arm], bool],
               time_weight: float) -> Callable[[Arm], float]:
    """prior(arm) = base(arm) (0 without one) − λ · OWED_ROUNDS where short(arm): the arm
    leaves its device short of its target this round (module docstring)."""
    def prior(arm: Arm) -> float:
        owed = time_weight * OWED_ROUNDS if short(arm) else 0.0
        return (base(arm) if base is not None else 0.0) - owed
    return prior
