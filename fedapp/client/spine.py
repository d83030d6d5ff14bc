"""FedSpine's client round: prune the local copy, tune LoRA on it, report what was kept.

One round, for orders with `spine_round` set (see `TrainInstructions`):

1. The base: at prune ratio 0, the process's cached 4-bit base (left untouched); above 0,
   this client's pruned copy from an earlier round with the same ratio, criterion and
   slices if the process still holds it (pruning happens once per configuration: steps 4's
   pruning is skipped and all `local_steps` train the small model), else a fresh copy
   (`load_base`), because pruning slices layers in place. A process keeps the last
   `FEDAPP_PRUNED_CACHE` (default 8; SmolLM2-135M: about 0.2 GB each) pruned copies; a
   deployed SuperNode, which starts a process per message, prunes every round.
2. A fresh trainable LoRA of the assigned rank, and the server's global low-rank term G
   (full shape) added beside each LoRA wrapper by `GlobalTerm`. Pruning slices a wrapper's
   base layer and LoRA in place but keeps the wrapper, so the hooks survive; after every
   slice G is re-sliced to the kept rows and columns ((B[kept_out]) (A[:, kept_in]) =
   G[kept_out][:, kept_in], exact).
3. The probe loss L_before on a fixed batch of the client's data (the first `batch_size`
   examples of its partition) of the model the server sent: the unpruned base plus G. With
   a reused pruned copy this takes one no-grad forward of the process's cached unpruned
   base, so that every round of every arm is measured against the same reference and the
   damage pruning does is always charged (measured against the pruned copy instead,
   repairing that damage would look like progress).
4. Prune and tune (`fedapp.pruning.iterative_prune`): S = `prune_slices` slices up to
   `prune_ratio`; after each of the first S − 1 slices T = min(`tune_steps`,
   `local_steps` // S) LoRA steps (`tune_steps` is capped so that every slice gets its
   share), after the last one the rest, so a round always takes
   `local_steps` optimizer steps, pruned or not. Taylor scores of slice 1 come from one
   backward pass on the probe batch, later ones from the tuning steps' gradients.
5. The probe loss L_after on the same batch, with the pruned, tuned model.

`train-seconds` covers steps 3-5 (scoring, re-quantising, tuning, both probes): the compute
a device of this class would spend. Loading the fresh copy is set-up, as for every strategy.
The reply holds the LoRA factors at the pruned shapes and, per pruned target module,
its kept rows and columns of the full layer (empty for a module inside a dropped block).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from logging import INFO

import torch
from flwr.common.logger import log
from peft import PeftModel

from fedapp.llm.adapters import PEFT_PREFIX, add_low_rank, frozen_delta, lora_state, with_lora
from fedapp.client.round import check_instructions, local_data
from fedapp.llm.data import collate
from fedapp.pruning.importance import CRITERIA
from strategies.protocol import TrainInstructions
from fedapp.llm.model import cached_base, default_device, load_base
from fedapp.pruning.surgery import PruneResult, iterative_prune
from fedapp.llm.train import TrainResult, peak_rss_mb, train_steps
from strategies.lora_math import Factors, split_factors
from strategies.scatter import KEPT_IN, KEPT_OUT, slice_factors


class GlobalTerm:
    """Adds scaling · x Aᵀ Bᵀ (the global update, sliced to the kept units) to the output of
    each LoRA wrapper of `model` named in `factors` (peft module keys)."""

    def __init__(self, model: PeftModel, factors: Factors, scaling: float = 1.0,
                 pruned: PruneResult | None = None) -> None:
        """`pruned`: how `model` was pruned already (its dropped blocks' factors are left
        out and the rest sliced to the kept units)."""
        modules = dict(model.named_modules())
        if pruned is not None:
            factors = {k: v for k, v in factors.items() if not _in_dropped(k, pruned)}
        unknown = sorted(set(factors) - set(modules))
        if unknown:
            raise ValueError(f"global adapter targets {unknown[:2]}, which the model lacks")
        self.full = {k: (a.float(), b.float()) for k, (a, b) in factors.items()}
        self.current = dict(self.full)
        self.scaling = scaling
        self.handles = [modules[key].register_forward_hook(self._hook(key)) for key in factors]
        if pruned is not None:
            self.reslice(pruned)

    def _hook(self, key: str):
        def hook(_module, inputs, output):
            if key not in self.current:  # its block was dropped
                return output
            a, b = self.current[key]
            return add_low_rank(inputs[0], output, a, b, self.scaling)
        return hook

    def reslice(self, result: PruneResult) -> None:
        """Follow the layers to their kept rows and columns (indices into the full shapes)."""
        kept = {PEFT_PREFIX + name: (k.out_idx, k.in_idx) for name, k in result.kept.items()
                if PEFT_PREFIX + name in self.full}
        self.current = {k: v for k, v in slice_factors(self.full, kept).items()
                        if not _in_dropped(k, result)}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _in_dropped(key: str, result: PruneResult) -> bool:
    name = key.removeprefix(PEFT_PREFIX)
    return any(name.startswith(block + ".") for block in result.dropped)


@contextmanager
def global_term(model: PeftModel, state: Mapping[str, torch.Tensor], scaling: float,
                pruned: PruneResult | None = None) -> Iterator[GlobalTerm | None]:
    term = GlobalTerm(model, split_factors(state), scaling, pruned) if state else None
    try:
        yield term
    finally:
        if term is not None:
            term.remove()


def check_spine_instructions(inst: TrainInstructions) -> None:
    check_instructions(inst)
    if not 0 <= inst.prune_ratio < 1:
        raise ValueError(f"prune-ratio={inst.prune_ratio}; allowed: 0 <= ratio < 1")
    if inst.prune_criterion not in CRITERIA:
        raise ValueError(f"prune-criterion={inst.prune_criterion!r}; allowed: {list(CRITERIA)}")
    if not 1 <= inst.prune_slices <= inst.local_steps:
        raise ValueError(f"prune-slices={inst.prune_slices}; allowed: 1..local-steps "
                         f"({inst.local_steps}): every slice is tuned at least one step")
    if inst.tune_steps < 1:
        raise ValueError(f"tune-steps={inst.tune_steps}; allowed: a positive integer")
    if inst.global_mode not in ("none", "frozen"):
        raise ValueError(f"global-mode={inst.global_mode!r} in a FedSpine round; allowed: "
                         "'none' or 'frozen' (the global update stays beside the pruned base)")


def kept_arrays(result: PruneResult, targets: list[str]) -> dict[str, torch.Tensor]:
    """Per pruned target module (peft key): kept rows and columns of the full layer, int64;
    both empty for a module inside a dropped block. Unpruned modules are left out."""
    out: dict[str, torch.Tensor] = {}
    for key in targets:
        name = key.removeprefix(PEFT_PREFIX)
        if name in result.kept:
            out[key + KEPT_OUT] = result.kept[name].out_idx.long()
            out[key + KEPT_IN] = result.kept[name].in_idx.long()
        elif _in_dropped(key, result):
            out[key + KEPT_OUT] = torch.zeros(0, dtype=torch.long)
            out[key + KEPT_IN] = torch.zeros(0, dtype=torch.long)
    return out


# (model, quantization, device, partition, ratio, criterion, slices) ->
#     (pruned base without LoRA, how it was pruned, all target module keys)
_PRUNED: OrderedDict[tuple, tuple[torch.nn.Module, PruneResult, list[str]]] = OrderedDict()


def pruned_cache_size() -> int:
    value = os.environ.get("FEDAPP_PRUNED_CACHE", "8")
    if not value.isdigit():
        raise ValueError(f"FEDAPP_PRUNED_CACHE={value!r}; allowed: an integer >= 0")
    return int(value)


def _keep_pruned(key: tuple, entry: tuple) -> None:
    _PRUNED[key] = entry
    while len(_PRUNED) > pruned_cache_size():
        _PRUNED.popitem(last=False)  # least recently used


@torch.no_grad()
def probe_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> float:
    device = next(model.parameters()).device
    model.eval()
    loss = float(model(**{k: v.to(device) for k, v in batch.items()}).loss)
    model.train()
    return loss


def global_probe_loss(inst: TrainInstructions, device: str,
                      global_state: Mapping[str, torch.Tensor],
                      probe: Mapping[str, torch.Tensor]) -> float:
    """Probe loss of the model the server sent: the cached unpruned base plus G."""
    base = cached_base(inst.model_path, inst.quantization, device)
    state = global_state if inst.global_mode == "frozen" else {}
    with frozen_delta(base, state, inst.global_scaling):
        return probe_loss(base, probe)


def run_spine_round(inst: TrainInstructions, partition_id: int, num_partitions: int,
                    global_state: Mapping[str, torch.Tensor], device: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, torch.Tensor]]:
    """Prune to the assigned ratio and tune a LoRA; return (adapter, metrics, kept indices)."""
    check_spine_instructions(inst)
    device = device or default_device()
    examples, batches, pad = local_data(inst, partition_id, num_partitions)
    pruning = inst.prune_ratio > 0
    key = (inst.model_path, inst.quantization, device, partition_id, inst.prune_ratio,
           inst.prune_criterion, inst.prune_slices)
    reuse = _PRUNED.pop(key, None) if pruning else None
    if reuse is not None:
        base, done, targets = reuse
    else:
        done = None
        base = (load_base(inst.model_path, inst.quantization, device) if pruning
                else cached_base(inst.model_path, inst.quantization, device))
    probe = collate(examples[:inst.batch_size], pad)
    slices = inst.prune_slices if pruning and done is None else 1
    tune = min(inst.tune_steps, inst.local_steps // slices)
    plan = [tune] * (slices - 1) + [inst.local_steps - tune * (slices - 1)]
    results: list[TrainResult] = []

    def tune_fn(model: torch.nn.Module) -> None:
        results.append(train_steps(model, batches, plan[len(results)], inst.lr))

    log(INFO, "Client %d: FedSpine round, prune ratio %.3f (%s, %d slices), r=%d, %d steps "
        "as %s", partition_id, inst.prune_ratio, inst.prune_criterion, slices, inst.lora_r,
        inst.local_steps, plan)
    with with_lora(base, inst.lora_r, inst.lora_alpha, list(inst.target_modules),
                   inst.seed) as model, \
            global_term(model, global_state if inst.global_mode == "frozen" else {},
                        inst.global_scaling, done) as term:
        if done is None:
            targets = [name for name, m in model.named_modules() if hasattr(m, "lora_A")]
        training_started = time.time()
        start = time.perf_counter()
        if done is None:  # the unpruned model + G, its fresh LoRA still zero
            loss_before = probe_loss(model, probe)
        else:
            loss_before = global_probe_loss(inst, device, global_state, probe)
        kept: dict[str, torch.Tensor] = {}
        params_ratio = 1.0
        if pruning and done is None:
            done = iterative_prune(
                model, inst.prune_ratio, slices, tune_fn, inst.prune_criterion,
                batches=[probe] if inst.prune_criterion != "magnitude" else None,
                on_prune=term.reslice if term is not None else None)
        else:
            tune_fn(model)
        if pruning:
            kept = kept_arrays(done, targets)
            params_ratio = done.params_after / done.params_before
        loss_after = probe_loss(model, probe)
        seconds = time.perf_counter() - start
        state = lora_state(model, getattr(torch, inst.wire_dtype))
    if pruning:  # `base` is the pruned model again, its LoRA removed
        _keep_pruned(key, (base, done, targets))
    steps = sum(r.steps for r in results)
    metrics = {
        "num-examples": float(len(examples)),
        "train-loss": sum(r.loss * r.steps for r in results) / steps,
        "train-seconds": seconds,
        "tune-seconds": sum(r.seconds for r in results),
        "peak-rss-mb": peak_rss_mb(),
        "lora-r": float(inst.lora_r),
        "prune-ratio": float(inst.prune_ratio),
        "params-ratio": params_ratio,
        "pruned-before": float(reuse is not None),  # 1: this configuration was pruned earlier
        "loss-before": loss_before,
        "loss-after": loss_after,
        "training-started": training_started,
    }
    log(INFO, "Client %d: probe loss %.4f -> %.4f, parameters kept %.3f, %.1f s", partition_id,
        loss_before, loss_after, params_ratio, seconds)
    return state, metrics, kept
