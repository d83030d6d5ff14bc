"""Checking a client's reply before it may touch the aggregate.

A reply is accepted only if it carries every expected adapter array with the shape the
assigned rank implies, finite values, and a positive finite `num-examples`. Anything else
is rejected with a reason that names what was wrong; the round goes on without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from flwr.app import RecordDict

from strategies.lora_math import LORA_A, LORA_B, LoraUpdate, split_factors
from strategies.protocol import ARRAYS, METRICS


class RejectedReply(ValueError):
    """A client reply that must not be aggregated; the message says why."""


def expected_shapes(module_shapes: Mapping[str, tuple[int, int]],
                    r: int) -> dict[str, tuple[int, int]]:
    """{peft key: shape} of a rank-r adapter over modules of shape (out, in)."""
    shapes: dict[str, tuple[int, int]] = {}
    for module, (out_features, in_features) in module_shapes.items():
        shapes[module + LORA_A] = (r, in_features)
        shapes[module + LORA_B] = (out_features, r)
    return shapes


def parse_reply(content: RecordDict, module_shapes: Mapping[str, tuple[int, int]], r: int,
                scaling: float, weight_key: str = "num-examples",
                fixed_a: Mapping[str, torch.Tensor] | None = None) -> LoraUpdate:
    """Validate a train reply against the rank-r adapter that was asked for.

    With `fixed_a` ({module: lora_A}, FFA-LoRA) the reply must hold lora_B only, and the
    update is completed with the server's A. Raises RejectedReply with the reason.
    """
    if ARRAYS not in content.array_records:
        raise RejectedReply(f"reply has no ArrayRecord '{ARRAYS}'")
    if METRICS not in content.metric_records:
        raise RejectedReply(f"reply has no MetricRecord '{METRICS}'")
    metrics = content.metric_records[METRICS]
    weight = metrics.get(weight_key)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise RejectedReply(f"metric '{weight_key}' is {weight!r}; expected a positive number")
    seconds = metrics.get("train-seconds", 0.0)
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise RejectedReply(f"metric 'train-seconds' is {seconds!r}; expected a time >= 0")
    state = content.array_records[ARRAYS].to_torch_state_dict()
    wanted = expected_shapes(module_shapes, r)
    if fixed_a is not None:
        wanted = {k: v for k, v in wanted.items() if k.endswith(LORA_B)}
    missing = sorted(set(wanted) - set(state))
    extra = sorted(set(state) - set(wanted))
    if missing or extra:
        raise RejectedReply(f"adapter keys differ from the rank-{r} adapter asked for: "
                            f"missing {missing[:2]}, unexpected {extra[:2]}")
    for key, shape in wanted.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise RejectedReply(f"'{key}' has shape {tuple(tensor.shape)}; expected {shape}")
        if not torch.isfinite(tensor).all():
            raise RejectedReply(f"'{key}' holds NaN or Inf")
    if fixed_a is not None:
        state = {**state, **{m + LORA_A: a for m, a in fixed_a.items()}}
    return LoraUpdate(factors=split_factors(state), scaling=scaling, weight=float(weight))
