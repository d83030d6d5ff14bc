"""Importance of prunable units and blocks, and the model-structure helpers pruning shares.

Criteria (higher score = keep): `magnitude_importance` (L2 norm of a KV group's / MLP
channel's weights), `taylor_importance` and the training-time `ImportanceTracker` (EMA of
|Σ activation × gradient| per unit), `llm_drop_importance` (per whole block, how much it
turns the residual stream), and `score`, which picks one by name. Each returns an
`Importance`: the scores plus what removing each unit / block saves in parameters.

Also here, because both criteria and `fedapp.pruning.surgery` need them (pruning imports this
module, never the reverse): the unit layout (`UNIT_LINEARS`, `Block`), `DroppedBlock`,
decoder-layer and live-block lookup, unit counts, Linear parameter counts and
`dense_weight` (4-bit weights dequantised).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Self

import torch
from torch import nn

from fedapp.llm.model import disable_bnb_cpu_repack

CRITERIA = ("magnitude", "taylor", "llm-drop")
BLOCKS = ("self_attn", "mlp")
# Per block: Linears cut by rows, Linears cut by columns. A unit owns equal contiguous
# slices of each (q: n_rep·head_dim rows, k/v: head_dim rows, o: n_rep·head_dim columns;
# gate/up: one row, down: one column), since query head h uses KV head h // n_rep.
UNIT_LINEARS = {"self_attn": (("q_proj", "k_proj", "v_proj"), ("o_proj",)),
                "mlp": (("gate_proj", "up_proj"), ("down_proj",))}
Block = tuple[int, str]  # (layer index, "self_attn" | "mlp")


@dataclass
class Importance:
    """Scores (higher = keep) and what removing a unit / block saves in parameters."""
    units: dict[Block, torch.Tensor]  # (i, "self_attn") -> (groups,); (i, "mlp") -> (channels,)
    unit_cost: dict[Block, int]
    block_cost: dict[Block, int]  # every live block
    blocks: dict[Block, float] = field(default_factory=dict)  # llm-drop scores


class DroppedBlock(nn.Module):
    """Stands in for a dropped attention or MLP block: its residual contribution is zero."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object
                ) -> torch.Tensor | tuple[torch.Tensor, None]:
        zeros = torch.zeros_like(hidden_states)  # (batch, seq, hidden)
        return (zeros, None) if self.kind == "self_attn" else zeros


def _layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers and their module-name prefix, through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, module in base.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return name, module
    raise ValueError(f"{type(base).__name__} has no decoder `layers`; allowed: Llama-family LMs")


def _live_blocks(model: nn.Module) -> dict[Block, nn.Module]:
    _, layers = _layers(model)
    return {(i, kind): getattr(layer, kind) for i, layer in enumerate(layers) for kind in BLOCKS
            if not isinstance(getattr(layer, kind), DroppedBlock)}


def _num_units(block: nn.Module, kind: str) -> int:
    return block.k_proj.out_features // block.head_dim if kind == "self_attn" else \
        block.up_proj.out_features


def _linear(module: nn.Module) -> nn.Module:
    """The Linear (plain or bnb Linear4bit) under a peft LoRA wrapper, or the module itself."""
    return module.base_layer if hasattr(module, "lora_A") else module


def _linear_params(module: nn.Module) -> int:
    linear = _linear(module)
    return linear.in_features * linear.out_features + (
        0 if linear.bias is None else linear.bias.numel())


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The weight as a float32 (out, in) tensor; 4-bit weights are dequantised."""
    state = getattr(linear.weight, "quant_state", None)
    if state is None:
        return linear.weight.detach().float()
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("a Linear4bit weight was repacked for CPU inference (bnb bug) and "
                         "cannot be dequantised; call disable_bnb_cpu_repack before any forward")
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(linear.weight.data, state).float()  # (out, in)


def _costs(model: nn.Module) -> Importance:
    """Parameters per unit and per live block; the criterion fills in the scores."""
    imp = Importance({}, {}, {})
    for key, block in _live_blocks(model).items():
        rows, cols = UNIT_LINEARS[key[1]]
        row_params = sum(_linear_params(getattr(block, a)) for a in rows)  # biases go too
        col_params = sum(getattr(block, a).in_features * getattr(block, a).out_features
                         for a in cols)
        imp.unit_cost[key] = (row_params + col_params) // _num_units(block, key[1])
        imp.block_cost[key] = row_params + sum(_linear_params(getattr(block, a)) for a in cols)
    return imp


def magnitude_importance(model: nn.Module) -> Importance:
    """L2 norm of each KV group's and MLP channel's weights (4-bit: dequantised)."""
    imp = _costs(model)
    for (i, kind), block in _live_blocks(model).items():
        n, (rows, cols) = _num_units(block, kind), UNIT_LINEARS[kind]
        sq = {a: dense_weight(_linear(getattr(block, a))).square() for a in rows + cols}
        total = sum(sq[a].sum(1).view(n, -1).sum(1) for a in rows)  # (n,)
        total = total + sum(sq[a].sum(0).view(n, -1).sum(1) for a in cols)  # (n,)
        imp.units[i, kind] = total.sqrt()
    return imp


class ImportanceTracker:
    """Taylor importance of KV groups and MLP channels, EMA-smoothed over training steps.

    Removing a unit zeroes its activation a (the o_proj input columns of the group's query
    heads; the down_proj input column of a channel), and nothing else depends on its weights,
    so the first-order loss change is -Σ_tokens a·∂L/∂a. Per step the score is
    |Σ_tokens a·∂L/∂a|, which equals |Σ g·w| over the unit's o_proj / down_proj weights (the
    Taylor criterion) yet needs no base-weight gradient: hooks read activation × gradient in
    the backward pass LoRA training runs anyway (with or without LoRA, 4-bit or not). Call
    `step()` per optimizer step; the EMA is s <- beta·s + (1 - beta)·score (first: s = score).
    """

    def __init__(self, model: nn.Module, beta: float = 0.9) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"beta={beta}; allowed: 0 <= beta < 1")
        self.model, self.beta, self.steps = model, beta, 0
        self._pending: dict[Block, torch.Tensor] = {}
        self._ema: dict[Block, torch.Tensor] = {}
        self._handles = [getattr(block, UNIT_LINEARS[key[1]][1][0]).register_forward_hook(
            partial(self._capture, key, _num_units(block, key[1])))
            for key, block in _live_blocks(model).items()]

    def _capture(self, key: Block, n: int, _m: nn.Module, inputs: tuple[torch.Tensor, ...],
                 _out: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and inputs[0].requires_grad):
            return
        act = inputs[0].detach()  # (batch, seq, in)

        def on_grad(grad: torch.Tensor) -> None:
            contrib = (act.float() * grad.float()).reshape(-1, act.shape[-1]).sum(0)  # (in,)
            self._pending[key] = self._pending.get(key, 0) + contrib.view(n, -1).sum(1)  # (n,)

        inputs[0].register_hook(on_grad)

    @property
    def observed(self) -> bool:
        return bool(self._pending or self._ema)

    def step(self) -> None:
        """Close a training step: fold |Σ a·∂L/∂a| of its backward passes into the EMA."""
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
                      beta: float = 0.9) -> Importance:
    """Taylor scores from one forward/backward pass per batch (an EMA step each); activations
    are made to require grad, so no LoRA is needed. Gradients left on parameters are cleared."""
    embed = model.get_input_embeddings().register_forward_hook(
        lambda _m, _i, out: out.requires_grad_(True))
    try:
        with ImportanceTracker(model, beta) as tracker:
            for batch in batches:
                model(**_lm_inputs(batch, labels=True)).loss.backward()
                tracker.step()
            return tracker.importance()
    finally:
        embed.remove()
        model.zero_grad(set_to_none=True)


def llm_drop_importance(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
                        ) -> Importance:
    """LLM-Drop: per live block, 1 - cos(x, x + f(x)) averaged over unpadded tokens, x being
    the residual stream entering the block and f the block (its norm included)."""
    disable_bnb_cpu_repack(model)  # the no-grad forwards below must not repack 4-bit weights
    _, layers = _layers(model)
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
    for (i, kind), block in _live_blocks(model).items():
        norm = getattr(layers[i], "input_layernorm" if kind == "self_attn" else
                       "post_attention_layernorm")
        handles += [norm.register_forward_pre_hook(
            lambda _m, args, key=(i, kind): residual.__setitem__(key, args[0])),
            block.register_forward_hook(partial(accumulate, (i, kind)))]
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
    """Importance by criterion name: 'magnitude', 'taylor' or 'llm-drop' (these two need
    calibration `batches` of input_ids / attention_mask)."""
    if criterion not in CRITERIA:
        raise ValueError(f"pruning criterion={criterion!r}; allowed: {list(CRITERIA)}")
    if criterion == "magnitude":
        return magnitude_importance(model)
    if not batches:
        raise ValueError(f"pruning criterion={criterion!r} needs calibration batches; got none")
    if criterion == "taylor":
        return taylor_importance(model, batches, beta)
    return llm_drop_importance(model, batches)
