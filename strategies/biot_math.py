"""Pure math of FedBiOT (`strategies.fedbiot`): which layers the emulator keeps, the
frozen adapter a client receives, and the emulator's alignment loss.

The model's N decoder layers split into the bottom N − a and the top a (the adapter, which
clients fine-tune with LoRA). The emulator replaces the bottom part by `keep` of its layers:
the ones that change the residual stream most, by LLM-Drop's score 1 − cos(x, x + f(x))
summed over a layer's attention and MLP blocks (a layer whose output is closest to its
input is dropped first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.lora_math import Factors


def layer_scores(block_scores: Mapping[tuple[int, str], float], num_layers: int) -> list[float]:
    """Per decoder layer, the sum of its blocks' scores ((layer, kind) -> score)."""
    scores = [0.0] * num_layers
    for (layer, _kind), value in block_scores.items():
        scores[layer] += float(value)
    return scores


def emulator_layers(scores: Sequence[float], adapter_layers: int, keep: int) -> tuple[int, ...]:
    """The layers the emulator runs, ascending: the `keep` highest-scoring of the bottom
    N − `adapter_layers` (ties: the lower layer) and all `adapter_layers` top ones.

    ValueError for an adapter of no layer or of every layer, and for an emulator that keeps
    no layer or more than the bottom part has."""
    n = len(scores)
    if not 0 < adapter_layers < n:
        raise ValueError(f"strategy.adapter_layers={adapter_layers}; allowed: 1..{n - 1} "
                         f"(the model has {n} decoder layers; the rest form the emulator)")
    bottom = n - adapter_layers
    if not 0 < keep <= bottom:
        raise ValueError(f"strategy.emulator_layers={keep}: an emulator must keep at least one "
                         f"of the {bottom} layers below the adapter; allowed: 1..{bottom}")
    ranked = sorted(range(bottom), key=lambda i: (-scores[i], i))[:keep]
    return tuple(sorted(ranked)) + tuple(range(bottom, n))


def frozen_adapter(emulator: Factors, adapter: Factors) -> Factors:
    """What a FedBiOT client keeps frozen, as one scaling-1 LoRA of per-module ranks: the
    emulator's alignment update E on its bottom layers and the global adapter G on the top
    ones (the modules are disjoint: ValueError otherwise)."""
    if shared := sorted(set(emulator) & set(adapter)):
        raise ValueError(f"the emulator's and the adapter's modules overlap: {shared[:3]}")
    return {**emulator, **adapter}


def fold_scaling(factors: Factors, scaling: float) -> Factors:
    """Scaling-1 factors of a LoRA with peft scaling s: (s·A, B)."""
    return {m: (scaling * a, b) for m, (a, b) in factors.items()}


def distill_loss(student: torch.Tensor, teacher: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """The emulator's alignment loss: KL(p_teacher ‖ p_student) of the next-token
    distributions (logits (batch, seq, vocab) of the full model and of the emulator, the
    same adapter on both), in nats, averaged over the unmasked positions."""
    log_t = torch.log_softmax(teacher.float(), dim=-1)
    log_s = torch.log_softmax(student.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (batch, seq)
    weight = torch.ones_like(kl) if mask is None else mask.to(kl.dtype)
    return (kl * weight).sum() / weight.sum().clamp_min(1.0)
