"""Structured pruning of a Llama-family causal LM: FedSpine's client-side prune-and-tune.

Units: a KV group (one key/value head with the `num_key_value_groups` query heads sharing it:
q/k/v rows + o columns; removing whole groups keeps `head_dim` and `num_key_value_groups`,
all that attention's forward reads, valid), an MLP channel (gate/up rows + down column), and
a whole block (a layer's `self_attn` or `mlp`, replaced by `DroppedBlock`, which adds zeros
to the residual stream). Layers really shrink: plain Linears are sliced, 4-bit ones
dequantised, sliced and re-quantised once. A peft LoRA on a sliced Linear is sliced with it
(lora_A columns, lora_B rows), so training goes on with the same adapter.

Prunable parameters: weights and biases of q/k/v/o/gate/up/down in the decoder layers
(embeddings, norms, lm_head are never pruned). A plan for `ratio` leaves each layer with
the units a plan for `ratio` on the unpruned model (its block costs, `full`) would leave
it, whatever path the model took there (as far as units already removed allow): a device
pruned to 0.5 in one step or in several ends with the same shapes (a global allocation,
`fedapp.pruning.allocation`, only at the same ratio). Without `full`, the model as scored
counts as unpruned.

Scoring lives in `fedapp.pruning.importance`, the unit layout in `structure`, the
least-squares refit of a pruned block's output Linear in `refit` (`refit_plan`; a bench
option only: a refitted base is no longer the base sliced to its kept indices, which is
how the server and a device's later rounds rebuild it); this module holds the plans
(`PrunePlan`, `plan_pruning`), the structural surgery (`slice_linear`, `prune_model`,
`compose`), parameter counts and `iterative_prune`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import floor

import torch
from torch import nn

from fedapp.llm import memory
from fedapp.llm.adapters import GLOBAL
from fedapp.llm.model import disable_bnb_cpu_repack
from fedapp.llm.scratch import use_scratch
from fedapp.pruning.allocation import ALLOCATIONS, block_removals, global_removals
from fedapp.pruning.importance import (
    GRADIENT_CRITERIA,
    Importance,
    ImportanceTracker,
    block_costs,
    score,
)
from fedapp.pruning.refit import refitted_weights
from fedapp.pruning.structure import (
    UNIT_LINEARS,
    Block,
    DroppedBlock,
    check_prunable,
    decoder_layers,
    dense_weight,
    linear_params,
    live_blocks,
    num_units,
)


@dataclass(frozen=True)
class KeptIndices:
    """Rows and columns of the full (unpruned) weight that a pruned Linear kept."""
    out_idx: torch.Tensor  # (out',) LongTensor
    in_idx: torch.Tensor  # (in',) LongTensor


@dataclass
class PrunePlan:
    """What to remove, as positions in the layers' current shapes."""
    kv_groups: dict[int, list[int]] = field(default_factory=dict)  # layer -> KV groups
    channels: dict[int, list[int]] = field(default_factory=dict)  # layer -> MLP channels
    blocks: list[Block] = field(default_factory=list)  # dropped whole


@dataclass
class PruneResult:
    """`kept` is keyed by module name in the transformers model (peft wrapper unwrapped,
    e.g. "model.layers.0.self_attn.q_proj"); `dropped` names the blocks dropped whole."""
    kept: dict[str, KeptIndices]
    dropped: list[str]
    params_before: int
    params_after: int


def parameter_count(model: nn.Module) -> int:
    """All parameters of the client's model (tied ones once); 4-bit weights count out × in
    values, not bytes. The server's frozen global adapter is not part of it: it is the
    server's update, held beside the model for one round."""
    return sum(int(torch.Size(p.quant_state.shape).numel()) if getattr(p, "quant_state", None)
               is not None else p.numel() for name, p in model.named_parameters()
               if f".{GLOBAL}." not in name)


def prunable_parameter_count(model: nn.Module) -> int:
    """Weights and biases of the attention and MLP Linears of all live blocks."""
    return sum(linear_params(getattr(block, name)) for (_, kind), block in
               live_blocks(model).items() for names in UNIT_LINEARS[kind] for name in names)


def expected_parameter_count(config: object, plan: PrunePlan, channel_group: int = 1) -> int:
    """Parameters of an unpruned bias-free Llama built from `config` after `plan`, whose MLP
    units are `channel_group` channels wide."""
    c = config
    hidden, layers = c.hidden_size, c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    n_rep = c.num_attention_heads // c.num_key_value_heads
    attn = (2 * c.num_attention_heads + 2 * c.num_key_value_heads) * hd * hidden
    mlp = 3 * c.intermediate_size * hidden
    total = c.vocab_size * hidden * (1 if c.tie_word_embeddings else 2) + hidden \
        + layers * (attn + mlp + 2 * hidden)  # embeddings, final norm, layers with 2 norms
    total -= sum((2 * n_rep + 2) * hd * hidden * len(g) for g in plan.kv_groups.values())
    total -= sum(3 * hidden * channel_group * len(ch) for ch in plan.channels.values())
    return total - sum(attn if kind == "self_attn" else mlp for _, kind in plan.blocks)


def slice_linear(linear: nn.Module, out_idx: torch.Tensor, in_idx: torch.Tensor,
                 refit: torch.Tensor | None = None) -> nn.Module:
    """A new Linear holding weight[out_idx][:, in_idx] (or refit[out_idx], `refit` an
    (out, in') weight fitted to the kept columns, `fedapp.pruning.refit`): plain, or
    re-quantised once in 4-bit with the original quant type, blocksize, storage and
    compute dtype."""
    if refit is not None and tuple(refit.shape) != (linear.out_features, len(in_idx)):
        raise ValueError(f"refit weight {tuple(refit.shape)}; allowed: (out, kept inputs) = "
                         f"({linear.out_features}, {len(in_idx)})")
    weight = dense_weight(linear)[out_idx][:, in_idx] if refit is None \
        else refit.float()[out_idx]  # (out', in')
    bias = None if linear.bias is None else linear.bias.detach()[out_idx]  # (out',)
    if getattr(linear.weight, "quant_state", None) is not None:
        return _requantize(linear, weight, bias)
    new = nn.Linear(len(in_idx), len(out_idx), bias=bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.requires_grad_(linear.weight.requires_grad)


def _requantize(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    import bitsandbytes as bnb

    state, device, storage = old.weight.quant_state, old.weight.device, old.weight.quant_storage
    new = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None,
                            compute_dtype=old.compute_dtype, compress_statistics=state.nested,
                            quant_type=state.quant_type, quant_storage=storage, device=device)
    new.weight = bnb.nn.Params4bit(  # .to(device) quantises: once, here
        weight.to(state.dtype), requires_grad=False, blocksize=state.blocksize,
        compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=storage,
        module=new).to(device)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=old.bias.requires_grad)
    new.compute_type_is_set = old.compute_type_is_set
    disable_bnb_cpu_repack(new)
    use_scratch(new)
    return new


def _slice_module(parent: nn.Module, attr: str, out_idx: torch.Tensor,
                  in_idx: torch.Tensor, refit: torch.Tensor | None = None) -> None:
    """Slice `parent.attr` in place (its base weight `refit` where given, see
    `slice_linear`); a peft LoRA wrapper keeps its slice of lora_A / lora_B."""
    module = getattr(parent, attr)
    if not hasattr(module, "lora_A"):
        setattr(parent, attr, slice_linear(module, out_idx, in_idx, refit))
        return
    if module.merged or getattr(module, "lora_variant", None):
        raise ValueError(f"{attr}: a merged or DoRA-style LoRA cannot be sliced; allowed: "
                         "plain unmerged LoRA")
    module.base_layer = slice_linear(module.base_layer, out_idx, in_idx, refit)
    for name in module.lora_A:
        rank = torch.arange(module.lora_A[name].out_features)
        module.lora_A[name] = slice_linear(module.lora_A[name], rank, in_idx)  # (r, in')
        module.lora_B[name] = slice_linear(module.lora_B[name], out_idx, rank)  # (out', r)
    module.in_features, module.out_features = len(in_idx), len(out_idx)


def _kept(n: int, removed: Iterable[int]) -> list[int]:
    """The units of 0..n-1 not in `removed`, in order."""
    gone = set(removed)
    return [u for u in range(n) if u not in gone]


def _units(keep: list[int], size: int) -> torch.Tensor:
    """Flat indices of units `keep`, each `size` wide: [k·size, (k+1)·size) for k in keep."""
    starts = torch.tensor(keep, dtype=torch.long)[:, None] * size  # (units, 1)
    return (starts + torch.arange(size)).flatten()  # (units·size,)


def _prune_block(block: nn.Module, kind: str, removed: list[int], name: str,
                 refits: Mapping[str, torch.Tensor]) -> dict[str, KeptIndices]:
    n, gone = num_units(block, kind), set(removed)
    what = f"{name} {'KV groups' if kind == 'self_attn' else 'channels'}"
    if bad := sorted(u for u in gone if not 0 <= u < n):
        raise ValueError(f"{what} {bad} out of range; allowed: 0..{n - 1}")
    if len(gone) >= n:
        raise ValueError(f"removing all {n} {what}; allowed: at most {n - 1}")
    keep = _kept(n, gone)
    rows, cols = UNIT_LINEARS[kind]
    cuts = {}
    for attr in rows + cols:
        m = getattr(block, attr)
        cuts[attr] = ((_units(keep, m.out_features // n), torch.arange(m.in_features))
                      if attr in rows else
                      (torch.arange(m.out_features), _units(keep, m.in_features // n)))
        _slice_module(block, attr, *cuts[attr], refits.get(f"{name}.{attr}"))
    sizes = {"num_key_value_heads": len(keep), "num_heads": len(keep) * getattr(
        block, "num_key_value_groups", 1)} if kind == "self_attn" else {
        "intermediate_size": block.up_proj.out_features}
    for attr, value in sizes.items():  # not read by forward in transformers 5; kept true
        if hasattr(block, attr):
            setattr(block, attr, value)
    return {f"{name}.{attr}": KeptIndices(o, i) for attr, (o, i) in cuts.items()}


def prune_model(model: nn.Module, plan: PrunePlan,
                refits: Mapping[str, torch.Tensor] | None = None) -> PruneResult:
    """Apply `plan` in place: slice KV groups and MLP channels, drop blocks whole; an output
    Linear named in `refits` takes that weight for its kept columns (`refit_plan`). An
    empty plan touches nothing (no re-quantisation), so ratio 0 is the identity."""
    before, spans = parameter_count(model), memory.tensor_spans(model)
    prefix, layers = decoder_layers(model)
    live = live_blocks(model)
    kept: dict[str, KeptIndices] = {}
    todo = [((i, "self_attn"), u) for i, u in plan.kv_groups.items()] + [
        ((i, "mlp"), u) for i, u in plan.channels.items()] + [(b, None) for b in plan.blocks]
    for (i, kind), units in todo:
        if (i, kind) not in live:
            raise ValueError(f"layer {i} {kind} is out of range or dropped; allowed: layers "
                             f"0..{len(layers) - 1}, live blocks")
        if units is None:
            setattr(layers[i], kind, DroppedBlock(kind))
        elif units:
            kept |= _prune_block(live[i, kind], kind, units, f"{prefix}.{i}.{kind}",
                                 refits or {})
    dropped = [f"{prefix}.{i}.{kind}" for i, kind in plan.blocks]
    memory.release_file_pages(spans, memory.tensor_spans(model))
    return PruneResult(_outside(kept, dropped), dropped, before, parameter_count(model))


def refit_plan(model: nn.Module, plan: PrunePlan,
               batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Least-squares refits (`fedapp.pruning.refit`) of the output Linear (o_proj,
    down_proj) of every block `plan` slices, fitted on `batches`; keyed as `prune_model`
    takes them."""
    prefix, _ = decoder_layers(model)
    live, targets = live_blocks(model), {}
    for kind, removed in (("self_attn", plan.kv_groups), ("mlp", plan.channels)):
        for i, units in removed.items():
            if units and (i, kind) in live:
                block, n = live[i, kind], num_units(live[i, kind], kind)
                (col,) = UNIT_LINEARS[kind][1]
                module = getattr(block, col)
                targets[f"{prefix}.{i}.{kind}.{col}"] = (
                    module, _units(_kept(n, units), module.in_features // n))
    return refitted_weights(model, targets, batches) if targets else {}


def _outside(kept: dict[str, KeptIndices], dropped: list[str]) -> dict[str, KeptIndices]:
    """Kept indices of Linears that are not inside a dropped block."""
    return {n: k for n, k in kept.items() if not any(n.startswith(d + ".") for d in dropped)}


def compose(first: PruneResult, then: PruneResult) -> PruneResult:
    """Two successive prunings as one: kept indices point into the original full shapes."""
    kept = dict(first.kept)
    for name, k in then.kept.items():
        prev = kept.get(name)
        kept[name] = k if prev is None else KeptIndices(prev.out_idx[k.out_idx],
                                                         prev.in_idx[k.in_idx])
    dropped = first.dropped + then.dropped
    return PruneResult(_outside(kept, dropped), dropped, first.params_before, then.params_after)


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[:n].tolist())


def plan_pruning(importance: Importance, ratio: float, full: Mapping[Block, int] | None = None,
                 end: float = 0.0, allocation: str = "uniform") -> PrunePlan:
    """What to remove so that `ratio` of the prunable parameters of the unpruned model
    (`full`: its block costs; default: the model as scored) are gone, least important first.

    Block scores (llm-drop): whole blocks in ascending score, each taken if it brings the
    removed count closer to the target, never both blocks of one layer. Unit scores: per
    layer (magnitudes are not comparable across layers) the unpruned layer's counts for
    `ratio` (`layer_counts`), no kind past its count for `end` (the path's final ratio,
    when above `ratio`), so a later step to `end` never finds a kind pruned past its
    one-step count; units already gone count towards them. `allocation="global"`: units
    ranked across layers instead (`fedapp.pruning.allocation`; `end` plays no part).
    """
    if not 0 <= ratio < 1 or not 0 <= end < 1:
        raise ValueError(f"prune ratio={ratio}, end={end}; allowed: 0 <= ratio, end < 1")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r}; allowed: {list(ALLOCATIONS)}")
    full = importance.block_cost if full is None else full
    plan = PrunePlan()
    if allocation == "global":  # refuses block scores
        for (i, kind), units in global_removals(importance, ratio, full).items():
            (plan.kv_groups if kind == "self_attn" else plan.channels)[i] = units
        return plan
    if importance.blocks:
        return PrunePlan(blocks=block_removals(importance, ratio, full))
    for i in sorted({i for i, _ in importance.units}):
        layer = {kind: (full[i, kind], importance.unit_cost[i, kind]) for j, kind in full
                 if j == i and (i, kind) in importance.unit_cost}
        now, last = layer_counts(layer, ratio), layer_counts(layer, max(ratio, end))
        for kind, (cost, unit) in layer.items():
            gone = cost // unit - len(importance.units[i, kind])
            n = max(gone, min(now[kind], last[kind])) - gone
            (plan.kv_groups if kind == "self_attn" else plan.channels)[i] = _lowest(
                importance.units[i, kind], n)
    return plan


def layer_counts(layer: Mapping[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """Units a one-step prune to `ratio` removes from an unpruned layer, given per kind its
    (prunable parameters, parameters per unit): n = round(ratio × G) of its G KV groups (no
    more than ratio × the layer's parameters pays for), then MLP channels for the rest of
    that, rounded to whole units; at least one unit of each kind stays."""
    target, counts = ratio * sum(cost for cost, _ in layer.values()), {}
    if "self_attn" in layer:
        cost, unit = layer["self_attn"]
        counts["self_attn"] = min(cost // unit - 1, floor(ratio * (cost // unit) + 0.5),
                                  floor(target / unit))
    if "mlp" in layer:
        cost, unit = layer["mlp"]
        rest = target - counts.get("self_attn", 0) * layer.get("self_attn", (0, 1))[1]
        counts["mlp"] = min(cost // unit - 1, max(0, floor(rest / unit + 0.5)))
    return counts


def _tune(model: nn.Module, tune_fn: Callable[[nn.Module], object], beta: float,
          track: str | None) -> Importance | None:
    """Run tune_fn; with `track` (a gradient criterion's name), return the scores its
    backward passes gave."""
    tracker = ImportanceTracker(model, beta, GRADIENT_CRITERIA[track]) if track else None
    try:
        tune_fn(model)
    finally:
        if tracker is not None:
            tracker.remove()
    return tracker.importance() if tracker is not None and tracker.observed else None


def iterative_prune(model: nn.Module, target_ratio: float, slices: int,
                    tune_fn: Callable[[nn.Module], object], criterion: str = "fisher",
                    batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
                    beta: float = 0.9, full: Mapping[Block, int] | None = None,
                    end: float = 0.0, refit: bool = False, allocation: str = "uniform"
                    ) -> PruneResult:
    """Prune in `slices` equal steps to `target_ratio` of the prunable parameters of the
    unpruned model (`full`: its block costs, as `block_costs` gives them; default: the
    model as it is now), from the ratio the model stands at, calling `tune_fn(model)` after
    each. Each slice plans against `full` and towards `end`, the path's final ratio (at
    least `target_ratio`; `plan_pruning`), so the end point has the shapes a one-step prune
    of the unpruned model to it would have, whatever steps led there (with `allocation`
    "uniform"; "global" reaches the ratio at shapes that depend on the path). The attached LoRA
    is sliced with the base, so tune_fn must build its optimizer from the model's
    parameters on every call.

    Taylor / Fisher scores come from the previous tune_fn run's gradients; the first slice scores on
    `batches`, or, without batches, on an extra tune_fn run before it. Every peft adapter
    of a wrapped layer (the trainable LoRA and a frozen global one) is sliced with it.
    `refit`: each slice's o_proj / down_proj keep least-squares refits of their kept
    columns, fitted on `batches` (`refit_plan`); the result's kept indices then no longer
    rebuild the model (`fedapp.pruning.refit`), and a plan that drops whole blocks has
    nothing to refit. `allocation`: `plan_pruning`'s.
    """
    if not 0 <= target_ratio < 1 or not 0 <= end < 1 or slices < 1:
        raise ValueError(f"target_ratio={target_ratio}, end={end}, slices={slices}; allowed:"
                         " 0 <= target_ratio < 1, 0 <= end < 1 and slices >= 1")
    if refit and not batches:
        raise ValueError("refit=True needs calibration batches; allowed: refit with batches")
    check_prunable(model)
    full = block_costs(model) if full is None else full
    start = 1 - prunable_parameter_count(model) / sum(full.values())
    gradient = criterion if criterion in GRADIENT_CRITERIA else None
    tracked = _tune(model, tune_fn, beta, track=gradient) if gradient and not batches else None
    total: PruneResult | None = None
    for s in range(1, slices + 1):
        importance = tracked if tracked is not None else score(model, criterion, batches, beta)
        ratio = start + (target_ratio - start) * s / slices
        plan = plan_pruning(importance, max(0.0, ratio), full, max(end, target_ratio),
                            allocation)
        result = prune_model(model, plan, refit_plan(model, plan, batches) if refit else None)
        total = result if total is None else compose(total, result)
        tracked = _tune(model, tune_fn, beta, track=gradient if s < slices else None)
    assert total is not None
    return total
