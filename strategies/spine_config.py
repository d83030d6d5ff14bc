"""FedSpine's own config sections (`strategy.bandit`, `strategy.prune`, `strategy.memory`),
read and checked before training, each unknown key or bad value refused by name."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from strategies.bandit import BanditConfig
from strategies.protocol import UNIT_CRITERIA, PruneOrder

POLICIES = ("bandit", "random")
# strategy.reward_from -> the client metric the reward's L_before is read from
REWARD_FROM = {"start": "loss-before", "pruned": "loss-pruned"}
REWARD_SCALES = ("round", "none")  # strategy.reward_scale: / the round's median gain, or not
PRUNE_KEYS = ("criterion", "slices", "tune_steps", "calibration", "allocation")
MEMORY_KEYS = ("fixed_mb", "base_mb", "lora_mb_per_rank")


def bandit_config(bandit: Mapping | None) -> BanditConfig:
    """`strategy.bandit` as a BanditConfig (which checks the values), unknown keys refused."""
    bandit = dict(bandit or {})
    allowed = [f.name for f in dataclasses.fields(BanditConfig)]
    if unknown := sorted(set(bandit) - set(allowed)):
        raise ValueError(f"strategy.bandit has unknown keys {unknown}; allowed: {allowed}")
    try:
        return BanditConfig.from_dict(bandit)
    except ValueError as err:
        raise ValueError(f"strategy.{err}") from None


def prune_template(prune: Mapping | None) -> PruneOrder:
    """`strategy.prune` as the PruneOrder every client gets (its ratio set per arm)."""
    prune = dict(prune or {})
    if unknown := sorted(set(prune) - set(PRUNE_KEYS)):
        raise ValueError(f"strategy.prune has unknown keys {unknown}; allowed: "
                         f"{list(PRUNE_KEYS)}")
    order = PruneOrder(ratio=0.0, **prune)
    if order.criterion == "llm-drop":
        raise ValueError("strategy.prune.criterion='llm-drop' drops whole blocks, which no "
                         "stock architecture loads, and each device's deployed model is "
                         f"exported as one; allowed: {', '.join(UNIT_CRITERIA)}")
    return order


def memory_model(memory: Mapping | None) -> dict[str, float]:
    """`strategy.memory`: the coefficients of an arm's estimated memory (all three, >= 0)."""
    memory = dict(memory or {k: 0.0 for k in MEMORY_KEYS})
    if sorted(memory) != sorted(MEMORY_KEYS) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
            for v in memory.values()):
        raise ValueError(f"strategy.memory={memory}; allowed: numbers >= 0 for exactly "
                         f"{list(MEMORY_KEYS)}")
    return {k: float(v) for k, v in memory.items()}


def check_options(arm_policy: str, time_weight: float, num_rounds: int, prune_at_end: bool,
                  personal: bool, reward_from: str, reward_scale: str = "round") -> None:
    """FedSpine's scalar options, each refused by name with what is allowed."""
    if arm_policy not in POLICIES:
        raise ValueError(f"strategy.arm_policy={arm_policy!r}; allowed: {list(POLICIES)}")
    if isinstance(time_weight, bool) or not (isinstance(time_weight, int | float)
                                             and math.isfinite(time_weight)
                                             and time_weight >= 0):
        raise ValueError(f"strategy.time_weight={time_weight!r}; allowed: a number >= 0")
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"num_rounds={num_rounds!r}; allowed: an int >= 1")
    for key, value in (("prune_at_end", prune_at_end), ("personal", personal)):
        if not isinstance(value, bool):
            raise ValueError(  # noqa: TRY004 - config errors are ValueErrors here
                f"strategy.{key}={value!r}; allowed: true, false")
    if reward_from not in REWARD_FROM:
        raise ValueError(f"strategy.reward_from={reward_from!r}; allowed: "
                         f"{list(REWARD_FROM)}")
    if reward_scale not in REWARD_SCALES:
        raise ValueError(f"strategy.reward_scale={reward_scale!r}; allowed: "
                         f"{list(REWARD_SCALES)}")
