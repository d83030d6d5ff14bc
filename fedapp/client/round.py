"""One client's local round, free of Flower, for every strategy.

    setup + order + global arrays -> trained LoRA (+ kept indices when pruned) and metrics

1. The base: the process's cached 4-bit base when nothing is pruned (a FedBiOT order: its
   emulator, `fedapp.llm.emulator`, only the ordered layers loaded); for a pruning order,
   this device's copy at the structure the server says it reached (`units`,
   `fedapp.pruning.units`): the process's copy if it holds one, else the copy this device
   stored on its disk after an earlier round (`fedapp.client.store`), else rebuilt by
   slicing a fresh copy of the base (`fedapp.client.pruned`).
2. The LoRA: a fresh trainable LoRA of `order.lora_r` (started from the global arrays when
   `global_mode` is "init"), beside the global update G as a frozen adapter when it is
   "frozen" (`fedapp.llm.adapters`; cut to the pruned copy's layers).
3. Training: `local_steps` optimizer steps. When the order's ratio is above the ratio the
   device reached (`PruneOrder.reached`), pruning goes on from there: S = `slices` slices
   up to `ratio` of the full model's prunable parameters (`fedapp.pruning.iterative_prune`,
   planned against the full model's shapes: one step or several to a ratio end alike),
   min(`tune_steps`, local_steps // S) steps after each of the first S − 1 slices, the rest
   after the last; else all steps tune. Pruning slices G's adapter with its layer, exactly.
4. Probes (pruning orders only, for the server's bandit): the loss on a fixed batch (the
   first `batch_size` examples of the partition) of the model the device starts from (its
   structure + G) before, and of the pruned, tuned model after. The device never holds
   the unpruned model beside its pruned one.

The reply of a pruning order adds the kept rows / columns of each target module and the
whole structure reached (`RoundResult.units`), which the server sends back next round.

`train-seconds` covers steps 3-4: the compute a device of this class would spend. Loading
is set-up, reported by the ClientApp as `setup-seconds`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log

from fedapp.client.pruned import (
    PrunedCopy,
    keep_copy,
    kept_arrays,
    slice_global,
    take_copy,
    target_keys,
    units_key,
)
from fedapp.client.selection import selected_examples
from fedapp.client.store import load_copy, store_copy, store_dir
from fedapp.llm.adapters import lora_state, target_module_shapes, with_lora
from fedapp.llm.data import collate, first_batches, train_batches
from fedapp.llm.emulator import cached_emulator
from fedapp.llm.loss import lm_loss
from fedapp.llm.memory import peak_rss_mb, return_freed_memory
from fedapp.llm.model import (
    cached_base,
    compute_in_fp32,
    default_device,
    load_base,
    weights_folder,
)
from fedapp.llm.train import TrainResult, set_gradient_checkpointing, train_steps
from fedapp.pruning.importance import block_costs
from fedapp.pruning.structure import Block
from fedapp.pruning.surgery import (
    PruneResult,
    compose,
    iterative_prune,
    parameter_count,
    prunable_parameter_count,
)
from fedapp.pruning.units import apply_units, units_of
from strategies.lora_math import LORA_A
from strategies.pipe_math import module_order
from strategies.protocol import PruneOrder, RunSetup, TrainOrder


@dataclass
class RoundResult:
    """What the client sends back: its adapter (wire dtype), metrics, kept indices of its
    target modules and the pruned structure it reached (`fedapp.pruning.units`)."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    units: dict[str, torch.Tensor] = field(default_factory=dict)


def local_data(setup: RunSetup, order: TrainOrder, partition_id: int, num_partitions: int
               ) -> tuple[list[dict], Iterator[dict[str, torch.Tensor]], int]:
    """Apply the thread count; (this client's examples, those its `train.selection` keeps,
    its endless batches, pad token id). A pooled order (the centralized upper bound) trains
    on every client's partition."""
    if setup.num_threads > 0:
        torch.set_num_threads(setup.num_threads)
    examples, pad = selected_examples(setup, num_partitions, partition_id)
    if order.pooled:
        examples = [e for i in range(num_partitions)
                    for e in selected_examples(setup, num_partitions, i)[0]]
    return examples, train_batches(examples, setup.batch_size, pad,
                                   seed=order.seed + 1000 * partition_id,
                                   multiple=setup.pad_multiple), pad


def step_plan(order: TrainOrder, slices: int) -> list[int]:
    """Optimizer steps after each of `slices` pruning slices; they sum to local_steps."""
    if order.prune is None or slices == 1:
        return [order.local_steps]
    tune = min(order.prune.tune_steps, order.local_steps // slices)
    return [tune] * (slices - 1) + [order.local_steps - tune * (slices - 1)]


@torch.no_grad()
def probe_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> float:
    device = next(model.parameters()).device
    model.eval()
    loss = float(lm_loss(model, {k: v.to(device) for k, v in batch.items()}))
    model.train()
    return loss


def structure(base: torch.nn.Module, setup: RunSetup, order: TrainOrder
              ) -> dict[str, int] | None:
    """A FedPipe order's {peft module key: rank} (modules at rank 0 left out); None for
    every other order. ValueError when the order lists another number of modules."""
    if order.pipe is None:
        return None
    keys = module_order(target_module_shapes(base, list(setup.target_modules)))
    if len(keys) != len(order.pipe.ranks):
        raise ValueError(f"the order's structure lists {len(order.pipe.ranks)} module ranks; "
                         f"this model has {len(keys)} target modules")
    return {k: r for k, r in zip(keys, order.pipe.ranks, strict=True) if r}


def stored_at(setup: RunSetup, device: str, units: Mapping[str, torch.Tensor]) -> Path:
    """Where this device keeps its base pruned to `units` (`fedapp.client.store`)."""
    return store_dir(setup.model_path, setup.quantization, device, units)


def keep_reached(setup: RunSetup, device: str, key: tuple, copy: PrunedCopy,
                 reached: Mapping[str, torch.Tensor]) -> None:
    """Keep the pruned copy a round ends with: in this process (for the next round here) and
    on the device's disk (a later round, in any process, loads it instead of the unpruned
    base)."""
    keep_copy(key[:-1] + (units_key(reached),), copy)
    if reached:
        store_copy(copy, stored_at(setup, device, reached),
                   weights_folder(setup.model_path, setup.quantization, device))


def round_base(setup: RunSetup, order: TrainOrder, partition_id: int, num_partitions: int,
               device: str, units: Mapping[str, torch.Tensor]
               ) -> tuple[tuple, torch.nn.Module, PrunedCopy | None, str]:
    """(pruned-copy key, the base to train on, its pruned copy or None, where that copy
    came from: "process", "store" or "" for neither): the process's
    cached base when nothing is or will be pruned; else this device's copy at `units` (the
    structure the server says it reached), reused from the process, else loaded from the
    device's store (`fedapp.client.store`), else rebuilt by slicing a fresh copy of the
    base."""
    prune = order.prune
    # A copy is reused only by the same run setup (model, targets, data), partition, device
    # and structure.
    key = (setup, num_partitions, partition_id, device, units_key(units))
    if order.pipe is not None and order.pipe.layers:  # FedBiOT: the emulator, never the base
        return key, cached_emulator(setup.model_path, setup.quantization, device,
                                    order.pipe.layers), None, ""
    if prune is None or (prune.ratio == 0 and not units):
        return key, cached_base(setup.model_path, setup.quantization, device), None, ""
    if (copy := take_copy(key)) is not None:
        return key, copy.base, copy, "process"
    if units and (copy := load_copy(stored_at(setup, device, units), setup.quantization,
                                    device, setup.target_modules)) is not None:
        return key, copy.base, copy, "store"
    base = load_base(setup.model_path, setup.quantization, device)
    full, count = block_costs(base), parameter_count(base)
    targets = target_keys(base, setup.target_modules)
    result = apply_units(base, units) if units else PruneResult({}, [], count, count)
    return key, base, PrunedCopy(base, result, targets, full), ""


def tune_with_probes(model: torch.nn.Module, prune: PruneOrder, slices: int | None,
                     tune: Callable[[torch.nn.Module], None], probe: Mapping[str, torch.Tensor],
                     probes: dict[str, float], calibration: list[Mapping[str, torch.Tensor]],
                     full: Mapping[Block, int]) -> PruneResult | None:
    """A pruning order's training: L_before of the model the device starts from (its
    structure + G, the fresh LoRA still zero), then prune on to `prune.ratio` of the full
    model (`full`: its block costs) in `slices` slices with `tune` after each (None: no
    pruning this round, tune once), then L_after; between them L_pruned, the loss just
    after the last slice (L_before when nothing is pruned).
    Returns how the model was pruned this round, if it was."""
    probes["loss-before"] = probes["loss-pruned"] = probe_loss(model, probe)

    def probed_tune(pruned: torch.nn.Module) -> None:  # after each slice: the last one counts
        probes["loss-pruned"] = probe_loss(pruned, probe)
        tune(pruned)

    done = None
    if slices is not None:
        done = iterative_prune(model, prune.ratio, slices, probed_tune, prune.criterion,
                               batches=calibration if prune.criterion != "magnitude"
                               else None, full=full, end=prune.target,
                               allocation=prune.allocation)
    else:
        tune(model)
    probes["loss-after"] = probe_loss(model, probe)
    return done


def memory_options(setup: RunSetup, base: torch.nn.Module) -> None:
    """train.gradient_checkpointing (on or off) and train.fp32_compute on the round's base."""
    set_gradient_checkpointing(base, setup.gradient_checkpointing)
    if setup.fp32_compute:
        compute_in_fp32(base)


def run_round(setup: RunSetup, order: TrainOrder, partition_id: int, num_partitions: int,
              global_state: Mapping[str, torch.Tensor], device: str | None = None,
              units: Mapping[str, torch.Tensor] | None = None) -> RoundResult:
    """Carry out `order` on this client's partition (see the module docstring); `units`:
    the pruned structure the device reached in earlier rounds (FedSpine), {} for none."""
    device = device or default_device()
    if setup.release_memory:
        return_freed_memory()  # once per process: see fedapp.llm.memory
    examples, batches, pad = local_data(setup, order, partition_id, num_partitions)
    key, base, copy, origin = round_base(setup, order, partition_id, num_partitions, device,
                                         units or {})
    memory_options(setup, base)
    prune, frozen = order.prune, dict(global_state) if order.global_mode == "frozen" else {}
    probe = collate(examples[:setup.batch_size], pad)
    probes: dict[str, float] = {}
    pruning_now = prune is not None and copy is not None and prune.ratio > prune.reached
    plan = step_plan(order, prune.slices if pruning_now else 1)
    log(INFO, "Client %d: %d examples, r=%d, %d steps%s", partition_id, len(examples),
        order.lora_r, order.local_steps, f", prune ratio {prune.reached:.3f} -> "
        f"{prune.ratio:.3f} ({prune.criterion}) as {plan}" if prune else "")
    results: list[TrainResult] = []

    def tune(model: torch.nn.Module) -> None:
        results.append(train_steps(model, batches, plan[len(results)], setup.lr,
                                   loss=setup.loss))

    with with_lora(base, order.lora_r, order.lora_alpha, list(setup.target_modules),
                   order.seed, global_state if order.global_mode == "init" else None,
                   slice_global(frozen, copy.result) if copy else frozen,
                   order.train_lora_a, structure(base, setup, order)) as model:
        training_started, start = time.time(), time.perf_counter()
        done = None
        if prune is None:
            tune(model)
        else:
            calibration = first_batches(examples, setup.batch_size, pad,
                                        prune.calibration) if pruning_now else []
            done = tune_with_probes(model, prune, len(plan) if pruning_now else None, tune,
                                    probe, probes, calibration, copy.full_costs if copy else {})
        seconds = time.perf_counter() - start
        state = lora_state(model, getattr(torch, setup.wire_dtype))
    if not order.train_lora_a:  # the server already holds A: send B only
        state = {k: v for k, v in state.items() if LORA_A not in k}
    metrics = round_metrics(len(examples), results, seconds, order, probes, state)
    metrics["training-started"] = training_started  # wall clock, for the ClientApp's figure
    if copy is None:
        return RoundResult(state, metrics)
    total = compose(copy.result, done) if done is not None else copy.result
    total = dataclasses.replace(total, params_after=parameter_count(base))  # LoRA removed
    reached = units_of(base, total)  # `base` is the pruned model again, its LoRA removed
    keep_reached(setup, device, key, PrunedCopy(base, total, copy.targets, copy.full_costs),
                 reached)
    metrics.update(pruned_metrics(base, total, copy, origin))
    log(INFO, "Probe loss %.4f -> %.4f, sparsity %.3f, parameters kept %.3f, %.1f s",
        probes["loss-before"], probes["loss-after"], metrics["sparsity"],
        metrics["params-ratio"], seconds)
    return RoundResult(state, metrics, kept_arrays(total, copy.targets), reached)


def pruned_metrics(base: torch.nn.Module, total: PruneResult, copy: PrunedCopy,
                   origin: str) -> dict[str, float]:
    """A pruned round's figures: parameters kept, sparsity reached, where its copy came from
    (`round_base`)."""
    return {"params-ratio": total.params_after / total.params_before,
            "sparsity": 1 - prunable_parameter_count(base) / copy.full_prunable,
            "pruned-before": float(origin == "process"), "pruned-stored": float(origin == "store")}


def round_metrics(num_examples: int, results: list[TrainResult], seconds: float,
                  order: TrainOrder, probes: dict[str, float],
                  state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The reply's metrics (`lora-params`: the parameters trained and sent in `state`);
    pruning orders add their probes (what pruning kept is added by run_round)."""
    steps = sum(r.steps for r in results)
    metrics = {
        "num-examples": float(num_examples),
        "train-loss": sum(r.loss * r.steps for r in results) / steps,
        "train-seconds": seconds,
        "peak-rss-mb": peak_rss_mb(),
        "lora-r": float(order.lora_r),
        "lora-params": float(sum(v.numel() for v in state.values())),
    }
    if order.prune is not None:
        metrics.update({
            "loss-before": probes["loss-before"], "loss-after": probes["loss-after"],
            "loss-pruned": probes["loss-pruned"],
            "tune-seconds": sum(r.seconds for r in results),
            "prune-ratio": float(order.prune.ratio),
            "params-ratio": 1.0, "sparsity": 0.0, "pruned-before": 0.0, "pruned-stored": 0.0,
        })
    return metrics
