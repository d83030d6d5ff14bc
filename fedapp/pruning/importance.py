"""Importance of prunable units and blocks (higher score = keep).

Criteria: `magnitude_importance` (L2 norm of a KV group's / MLP channel's weights),
`taylor_importance` and the training-time `ImportanceTracker` (EMA per unit of
|Σ_positions Σ_unit a·∂L/∂a|, `taylor`, or of Σ_positions (Σ_unit a·∂L/∂a)², `fisher`,
with a the unit's activations), `llm_drop_importance` (per whole block, how much it turns the residual
stream), and `score`, which picks one by name (`strategies.protocol.CRITERIA`). Each returns
an `Importance`: the scores plus what removing each unit / block saves in parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Self

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedapp.llm.data import IGNORE_INDEX
from fedapp.llm.loss import lm_loss
from fedapp.llm.model import disable_bnb_cpu_repack
from fedapp.pruning.structure import (
    UNIT_LINEARS,
    Block,
    base_linear,
    decoder_layers,
    dense_weight,
    linear_params,
    live_blocks,
    num_units,
)
from strategies.protocol import CRITERIA

# the criteria scored from activation × gradient (also during training): name -> second order
GRADIENT_CRITERIA = {"taylor": False, "fisher": True}


@dataclass
class Importance:
    """Scores (higher = keep) and what removing a unit / block saves in parameters."""
    units: dict[Block, torch.Tensor]  # (i, "self_attn") -> (groups,); (i, "mlp") -> (channels,)
    unit_cost: dict[Block, int]
    block_cost: dict[Block, int]  # every live block
    blocks: dict[Block, float] = field(default_factory=dict)  # llm-drop scores


def _costs(model: nn.Module) -> Importance:
    """Parameters per unit and per live block; the criterion fills in the scores."""
    imp = Importance({}, {}, {})
    for key, block in live_blocks(model).items():
        rows, cols = UNIT_LINEARS[key[1]]
        row_params = sum(linear_params(getattr(block, a)) for a in rows)  # biases go too
        col_params = sum(getattr(block, a).in_features * getattr(block, a).out_features
                         for a in cols)
        imp.unit_cost[key] = (row_params + col_params) // num_units(block, key[1])
        imp.block_cost[key] = row_params + sum(linear_params(getattr(block, a)) for a in cols)
    return imp


def block_costs(model: nn.Module) -> dict[Block, int]:
    """The prunable parameters of each live block (what `plan_pruning` calls `full` when
    taken on the unpruned model)."""
    return _costs(model).block_cost


def magnitude_importance(model: nn.Module) -> Importance:
    """L2 norm of each KV group's and MLP channel's weights (4-bit: dequantised)."""
    imp = _costs(model)
    for (i, kind), block in live_blocks(model).items():
        n, (rows, cols) = num_units(block, kind), UNIT_LINEARS[kind]
        sq = {a: dense_weight(base_linear(getattr(block, a))).square() for a in rows + cols}
        total = sum(sq[a].sum(1).view(n, -1).sum(1) for a in rows)  # (n,)
        total = total + sum(sq[a].sum(0).view(n, -1).sum(1) for a in cols)  # (n,)
        imp.units[i, kind] = total.sqrt()
    return imp


class ImportanceTracker:
    """Taylor importance of KV groups and MLP channels, EMA-smoothed over training steps.

    Removing a unit zeroes its activation a (the o_proj input columns of the group's query
    heads; the down_proj input column of a channel), and nothing else depends on its weights.
    Hooks read activation × gradient in the backward pass LoRA training runs anyway (with or
    without LoRA, 4-bit or not), so no base-weight gradient is needed. Per step the score is

    - first order (`taylor`): |Σ_tokens a·∂L/∂a|, the first-order loss change, which equals
      |Σ g·w| over the unit's o_proj / down_proj weights;
    - second order (`fisher`, `second_order=True`): Σ_tokens (Σ_unit a·∂L/∂a)², the
      squared gradient of the batch's loss with respect to a gate on the unit at each token
      position, summed: a Fisher-style second-order estimate of the loss change (the
      gradient at a position is the whole batch loss's, not one token's). At a trained model the
      gradient's mean is near zero, so the first-order sum cancels across tokens and ranks
      units by noise; the squares do not cancel. On SmolLM2-135M 4-bit, two partitions
      (`scripts/bench_criteria.py`, `runs/bench-criteria/20261206-criteria.txt`): held-out
      loss right after pruning to 0.5 8.09 against 12.29, after 48 recovery steps 5.77
      against 6.17 (unpruned 3.41); at 0.25, 4.27 against 4.39.

    Every optimizer step taken while the tracker is live closes a step (a torch optimizer
    hook, so the training loop needs no change; `step()` does it by hand): the EMA is
    s <- beta·s + (1 - beta)·score (first: s = score).
    """

    def __init__(self, model: nn.Module, beta: float = 0.9, second_order: bool = False
                 ) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"beta={beta}; allowed: 0 <= beta < 1")
        self.model, self.beta, self.second_order, self.steps = model, beta, second_order, 0
        self._pending: dict[Block, torch.Tensor] = {}
        self._ema: dict[Block, torch.Tensor] = {}
        self._handles = [getattr(block, UNIT_LINEARS[key[1]][1][0]).register_forward_hook(
            partial(self._capture, key, num_units(block, key[1])))
            for key, block in live_blocks(model).items()]
        self._handles.append(register_optimizer_step_post_hook(lambda *_: self.step()))

    def _capture(self, key: Block, n: int, _m: nn.Module, inputs: tuple[torch.Tensor, ...],
                 _out: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and inputs[0].requires_grad):
            return
        act = inputs[0].detach()  # (batch, seq, in)

        def on_grad(grad: torch.Tensor) -> None:
            per_unit = (act.float() * grad.float()).reshape(-1, n, act.shape[-1] // n).sum(2)
            contrib = per_unit.square().sum(0) if self.second_order else per_unit.sum(0)  # (n,)
            self._pending[key] = self._pending.get(key, 0) + contrib

        inputs[0].register_hook(on_grad)

    @property
    def observed(self) -> bool:
        return bool(self._pending or self._ema)

    def step(self) -> None:
        """Close a training step: fold its backward passes' scores into the EMA."""
        for key, signed in self._pending.items():
            prev = self._ema.get(key)
            s = signed.abs()
            self._ema[key] = s if prev is None else self.beta * prev + (1 - self.beta) * s
        self._pending.clear()
        self.steps += 1

    def importance(self) -> Importance:
        if self._pending:
            self.step()
        if not self._ema:
            raise ValueError("no gradient reached the tracked layers; run backward passes with "
                             "LoRA attached, or use taylor_importance with batches")
        imp = _costs(self.model)
        imp.units = {key: s.clone() for key, s in self._ema.items()}
        return imp

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _lm_inputs(batch: Mapping[str, torch.Tensor], labels: bool) -> dict[str, torch.Tensor]:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    if labels:
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        inputs["labels"] = batch.get("labels", ids if mask is None else ids.masked_fill(
            mask == 0, -100))
    return inputs


def taylor_importance(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                      beta: float = 0.9, rows: int = 1, second_order: bool = False
                      ) -> Importance:
    """Taylor scores (first or `second_order`: `ImportanceTracker`) from one
    forward/backward pass per batch (an EMA step each); activations are made to require
    grad, so no LoRA is needed. Gradients left on parameters are cleared.

    A device's first pruning round scores its unpruned model, so this pass is kept small:
    the chunked loss (`fedapp.llm.loss`: no full-vocabulary logits) and `rows` examples of a
    batch at a time, each part's loss weighted by its share of the batch's labelled tokens,
    so that their gradients sum to the whole batch's and the scores are the batch's (rows
    do not interact, so each token position's gradient is the whole batch's too)."""
    embed = model.get_input_embeddings().register_forward_hook(
        lambda _m, _i, out: out.requires_grad_(True))
    try:
        with ImportanceTracker(model, beta, second_order) as tracker:
            for batch in batches:
                inputs = _lm_inputs(batch, labels=True)
                total = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
                for start in range(0, len(inputs["input_ids"]), rows):
                    part = {k: v[start:start + rows] for k, v in inputs.items()}
                    count = int((part["labels"][:, 1:] != IGNORE_INDEX).sum())
                    if count:
                        (lm_loss(model, part) * (count / total)).backward()
                tracker.step()
            return tracker.importance()
    finally:
        embed.remove()
        model.zero_grad(set_to_none=True)


def residual_points(layer: nn.Module, kind: str, block: nn.Module
                    ) -> tuple[nn.Module, nn.Module]:
    """(the module whose input is the residual stream x entering `block`, the module whose
    output f(x) is what the block adds to it). Llama / Qwen2: the block's pre-norm and the
    block; Gemma-2/3, whose blocks sit between a pre- and a post-norm ("sandwich"): the
    pre-norm and the post-norm (`post_attention_layernorm` is the attention's post-norm
    there, not the MLP's pre-norm)."""
    if hasattr(layer, "pre_feedforward_layernorm"):  # sandwich norms
        if kind == "self_attn":
            return layer.input_layernorm, layer.post_attention_layernorm
        return layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm
    return (layer.input_layernorm if kind == "self_attn" else layer.post_attention_layernorm,
            block)


def llm_drop_importance(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
                        ) -> Importance:
    """LLM-Drop: per live block, 1 - cos(x, x + f(x)) averaged over unpadded tokens, x being
    the residual stream entering the block and f the block (its norm included)."""
    disable_bnb_cpu_repack(model)  # the no-grad forwards below must not repack 4-bit weights
    _, layers = decoder_layers(model)
    imp = _costs(model)
    sums = dict.fromkeys(imp.block_cost, 0.0)
    residual: dict[Block, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def accumulate(key: Block, _m: nn.Module, _args: object, out: object) -> None:
        x = residual.pop(key)  # (batch, seq, hidden)
        fx = out[0] if isinstance(out, tuple) else out
        dist = 1 - nn.functional.cosine_similarity(x.float(), (x + fx).float(), dim=-1)
        weight = torch.ones_like(dist) if mask[0] is None else mask[0].to(dist.dtype)
        sums[key] += float((dist * weight).sum())  # (batch, seq) -> scalar

    handles = []
    for (i, kind), block in live_blocks(model).items():
        enters, adds = residual_points(layers[i], kind, block)
        handles += [enters.register_forward_pre_hook(
            lambda _m, args, key=(i, kind): residual.__setitem__(key, args[0])),
            adds.register_forward_hook(partial(accumulate, (i, kind)))]
    tokens = 0.0
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = _lm_inputs(batch, labels=False)
                mask[0] = inputs.get("attention_mask")
                tokens += float(inputs["input_ids"].numel() if mask[0] is None else mask[0].sum())
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    imp.blocks = {key: total / max(tokens, 1.0) for key, total in sums.items()}
    return imp


def score(model: nn.Module, criterion: str,
          batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
          beta: float = 0.9) -> Importance:
    """Importance by criterion name: 'magnitude', 'taylor', 'fisher' or 'llm-drop' (the
    last three need calibration `batches` of input_ids / attention_mask)."""
    if criterion not in CRITERIA:
        raise ValueError(f"pruning criterion={criterion!r}; allowed: {list(CRITERIA)}")
    if criterion == "magnitude":
        return magnitude_importance(model)
    if not batches:
        raise ValueError(f"pruning criterion={criterion!r} needs calibration batches; got none")
    if criterion in GRADIENT_CRITERIA:
        return taylor_importance(model, batches, beta,
                                 second_order=GRADIENT_CRITERIA[criterion])
    return llm_drop_importance(model, batches)
