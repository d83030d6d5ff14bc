"""FedSpine's reward: what an arm earned in a round, from the client's probe losses and its
completion time as the server measured them. Plain functions, no state.

**Reward.** `reward()` is the quality gain per unit of completion time, both as seen by
the server:

    g = clip((L_before − L_after) / max(|L_before|, ε), −1, 1),   s = (median_j T_j / T_k)^λ
    reward = clip(per_time(g, s), −1, 1),   per_time(g, s) = g · s if g >= 0 else g / s

the relative loss improvement of the client's local training, scaled by its speed against
the round's median client (λ = `time_weight`: 1 is gain per median-time; 0 ignores time).
A faster arm is better whatever the sign of g (a loss that got worse is charged more when
it took longer). The time part scales with the gain: as every device's improvement shrinks
over a run, a fixed additive time penalty (the form before, g − λ(T_k/M − 1)) would come
to outweigh it and push devices to the cheapest arm (the phones' rewards in rounds 4-6 of
`runs/bench-fedspine-path/20261205-001557` were all time penalty). Clipping keeps one
diverging client from dominating the smoothed mean.

**Relative reward** (`round_rewards(..., relative=True)`, FedSpine's `reward_scale: round`).
Every device's gain shrinks as the shared model converges (the phones' rewards in
`runs/bench-fedspine-long/20261205-113720`: 0.053 in rounds 1-5, 0.009-0.014 after), so an
arm played early keeps a high mean and one played late a low one, whatever they are worth:
the smoothed means compare rounds, not arms. Dividing each reward by the size of the same
round's gains across its devices,

    reward_k / m,   m = max(median_j |g_j|, SCALE_FLOOR),   clipped to ±RELATIVE_CLIP,

takes out that common drift (a device's own level against the others is a constant its
bandit does not see: it compares its own arms). A client without a valid reply earns
−RELATIVE_CLIP − λ (−1 − λ unscaled), below every valid reward.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping

EPSILON = 1e-8
SCALE_FLOOR = 1e-3  # the least round scale m of a relative reward: gains of 0.1 % are noise
RELATIVE_CLIP = 10.0  # a relative reward's bound: one round's outlier cannot own a mean


def speed(reference: float, seconds: float, time_weight: float) -> float:
    """(reference / seconds)^λ: how much faster than `reference` a client taking `seconds` is,
    to the power λ (inf where that overflows)."""
    try:
        return (max(reference, EPSILON) / max(seconds, EPSILON)) ** time_weight
    except OverflowError:
        return math.inf


def per_time(gain: float, speed: float) -> float:
    """gain · speed for a gain >= 0, gain / speed otherwise: the faster (speed > 1), the
    better, whatever the sign."""
    if gain == 0:
        return 0.0
    return gain * speed if gain > 0 else gain / speed


def gain(loss_before: float, loss_after: float) -> float:
    """g = clip((L_before − L_after) / |L_before|, −1, 1), both losses finite."""
    for name, value in (("loss_before", loss_before), ("loss_after", loss_after)):
        if not math.isfinite(value):
            raise ValueError(f"reward: {name}={value!r}; allowed: a finite loss")
    return min(1.0, max(-1.0, (loss_before - loss_after) / max(abs(loss_before), EPSILON)))


def reward(loss_before: float, loss_after: float, time_k: float, round_times: Iterable[float],
           time_weight: float) -> float:
    """clip(per_time(g, (median(T) / T_k)^λ), −1, 1), g = clip(ΔL / |L_before|, −1, 1).

    Args:
        loss_before, loss_after: the client's loss before and after its local round (FedSpine:
            on a fixed probe batch of its own data).
        time_k: the client's completion time this round (compute × slow-down + transfer).
        round_times: completion times of every client of the round, this one included.
        time_weight: λ >= 0, the exponent of the speed: 1 = gain per median-time, 0 = gain.
    """
    times = [float(x) for x in round_times]
    improvement = gain(loss_before, loss_after)
    if not (math.isfinite(time_k) and time_k >= 0):
        raise ValueError(f"reward: time_k={time_k!r}; allowed: a finite time >= 0")
    if not times or not all(math.isfinite(x) and x >= 0 for x in times):
        raise ValueError(f"reward: round_times={times}; allowed: a non-empty list of finite "
                         f"times >= 0")
    if not (math.isfinite(time_weight) and time_weight >= 0):
        raise ValueError(f"reward: time_weight={time_weight!r}; allowed: a finite λ >= 0")
    faster = speed(statistics.median(times), time_k, time_weight)
    return min(1.0, max(-1.0, per_time(improvement, faster)))


def round_rewards(results: Mapping[str, tuple[float, float, float]], time_weight: float,
                  relative: bool) -> dict[str, float]:
    """Every valid reply's reward from its (L_before, L_after, T_k): `reward` against the
    round's times, and with `relative` divided by the round's scale
    m = max(median_j |g_j|, SCALE_FLOOR) and clipped to ±RELATIVE_CLIP (module docstring)."""
    times = [t for _, _, t in results.values()]
    scale = max(statistics.median(abs(gain(b, a)) for b, a, _ in results.values()),
                SCALE_FLOOR) if relative and results else 1.0
    bound = RELATIVE_CLIP if relative else 1.0
    return {name: min(bound, max(-bound, reward(b, a, t, times, time_weight) / scale))
            for name, (b, a, t) in results.items()}


def failed_reward(time_weight: float, relative: bool) -> float:
    """What a client without a valid reply earns: −bound − λ, below every valid reward."""
    return -(RELATIVE_CLIP if relative else 1.0) - time_weight
