"""One client's local round, free of Flower, for every strategy.

    setup + order + global arrays -> trained LoRA (+ kept indices when pruned) and metrics

1. The base: the process's cached 4-bit base; for a pruning order with ratio > 0, this
   client's pruned copy of an earlier round with the same configuration if the process
   holds it (`fedapp.client.pruned`), else a fresh copy to prune.
2. The LoRA: a fresh trainable LoRA of `order.lora_r` (started from the global arrays when
   `global_mode` is "init"), beside the global update G as a frozen adapter when it is
   "frozen" (`fedapp.llm.adapters`; cut to a reused pruned copy's layers).
3. Training: `local_steps` optimizer steps. A pruning order splits them: S = `slices`
   slices up to `ratio` (`fedapp.pruning.iterative_prune`), min(`tune_steps`,
   local_steps // S) steps after each of the first S − 1 slices, the rest after the last;
   a reused copy trains all of them. Pruning slices G's adapter with its layer, exactly.
4. Probes (pruning orders only, for the server's bandit): the loss on a fixed batch (the
   first `batch_size` examples of the partition) of the model the server sent (unpruned
   base + G) before, and of the pruned, tuned model after.

`train-seconds` covers steps 3-4: the compute a device of this class would spend. Loading
is set-up, reported by the ClientApp as `setup-seconds`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from logging import INFO

import torch
from flwr.common.logger import log

from fedapp.client.partition import partition_examples
from fedapp.client.pruned import PrunedCopy, keep_copy, kept_arrays, slice_global, take_copy
from fedapp.llm.adapters import lora_state, with_lora
from fedapp.llm.data import collate, train_batches
from fedapp.llm.loss import lm_loss
from fedapp.llm.memory import peak_rss_mb, return_freed_memory
from fedapp.llm.model import cached_base, default_device, load_base
from fedapp.llm.train import TrainResult, set_gradient_checkpointing, train_steps
from fedapp.pruning.surgery import PruneResult, iterative_prune
from strategies.lora_math import LORA_A
from strategies.protocol import PruneOrder, RunSetup, TrainOrder


@dataclass
class RoundResult:
    """What the client sends back: its adapter (wire dtype), metrics, kept indices."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    kept: dict[str, torch.Tensor] = field(default_factory=dict)


def local_data(setup: RunSetup, order: TrainOrder, partition_id: int, num_partitions: int
               ) -> tuple[list[dict], Iterator[dict[str, torch.Tensor]], int]:
    """Apply the thread count; (this client's examples, its endless batches, pad token id).
    A pooled order (the centralized upper bound) trains on every client's partition."""
    if setup.num_threads > 0:
        torch.set_num_threads(setup.num_threads)
    examples, pad = partition_examples(setup, num_partitions, partition_id)
    if order.pooled:
        examples = [e for i in range(num_partitions)
                    for e in partition_examples(setup, num_partitions, i)[0]]
    return examples, train_batches(examples, setup.batch_size, pad,
                                   seed=order.seed + 1000 * partition_id), pad


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


def sent_model_loss(setup: RunSetup, order: TrainOrder, device: str,
                    frozen: Mapping[str, torch.Tensor],
                    probe: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """(probe loss, seconds of its forward) of the model the server sent: the cached
    unpruned base + G, measured beside a reused pruned copy so that its pruning damage is
    always charged. Attaching the adapters is set-up: neither timed nor seeding torch."""
    base = cached_base(setup.model_path, setup.quantization, device)
    with torch.random.fork_rng(devices=[]), with_lora(
            base, order.lora_r, order.lora_alpha, list(setup.target_modules), order.seed,
            frozen_global=frozen) as model:
        start = time.perf_counter()
        loss = probe_loss(model, probe)  # the fresh LoRA's B is zero: it adds exactly 0
        return loss, time.perf_counter() - start


def round_base(setup: RunSetup, order: TrainOrder, partition_id: int, num_partitions: int,
               device: str) -> tuple[tuple, torch.nn.Module, PrunedCopy | None]:
    """(pruned-copy key, the base to train on, the reused pruned copy or None): the cached
    base, or for a pruning order a copy pruned earlier, or a fresh one to prune."""
    prune = order.prune
    # A copy is reused only by the same run setup (model, targets, data), partition and plan.
    key = (setup, num_partitions, partition_id, device, *(
        (prune.ratio, prune.criterion, prune.slices) if prune else ()))
    if prune is None or prune.ratio == 0:
        return key, cached_base(setup.model_path, setup.quantization, device), None
    copy = take_copy(key)
    if copy is not None:
        return key, copy.base, copy
    return key, load_base(setup.model_path, setup.quantization, device), None


def tune_with_probes(model: torch.nn.Module, prune: PruneOrder, slices: int | None,
                     tune: Callable[[torch.nn.Module], None], probe: Mapping[str, torch.Tensor],
                     probes: dict[str, float]) -> PruneResult | None:
    """A pruning order's training: L_before (unless measured already), then prune in
    `slices` slices with `tune` after each (None: no pruning this round, tune once), then
    L_after. Returns how the model was pruned this round, if it was."""
    if "loss-before" not in probes:  # the model the server sent, its fresh LoRA still zero
        probes["loss-before"] = probe_loss(model, probe)
    done = None
    if slices is not None:
        done = iterative_prune(model, prune.ratio, slices, tune, prune.criterion,
                               batches=[probe] if prune.criterion != "magnitude" else None)
    else:
        tune(model)
    probes["loss-after"] = probe_loss(model, probe)
    return done


def run_round(setup: RunSetup, order: TrainOrder, partition_id: int, num_partitions: int,
              global_state: Mapping[str, torch.Tensor],
              device: str | None = None) -> RoundResult:
    """Carry out `order` on this client's partition (see the module docstring)."""
    device = device or default_device()
    if setup.release_memory:
        return_freed_memory()  # once per process: see fedapp.llm.memory
    examples, batches, pad = local_data(setup, order, partition_id, num_partitions)
    key, base, copy = round_base(setup, order, partition_id, num_partitions, device)
    set_gradient_checkpointing(base, setup.gradient_checkpointing)
    prune, frozen = order.prune, dict(global_state) if order.global_mode == "frozen" else {}
    probe = collate(examples[:setup.batch_size], pad)
    probes, probe_seconds = {}, 0.0
    if copy is not None:  # L_before beside the reused copy; `pruned-before` marks it
        probes["loss-before"], probe_seconds = sent_model_loss(setup, order, device, frozen,
                                                               probe)
        probes["pruned-before"] = 1.0
    pruning_now = prune is not None and prune.ratio > 0 and copy is None
    plan = step_plan(order, prune.slices if pruning_now else 1)
    log(INFO, "Client %d: %d examples, r=%d, %d steps%s", partition_id, len(examples),
        order.lora_r, order.local_steps, f", prune ratio {prune.ratio:.3f} ({prune.criterion}"
        f"{', reused copy' if copy else ''}) as {plan}" if prune else "")
    results: list[TrainResult] = []

    def tune(model: torch.nn.Module) -> None:
        results.append(train_steps(model, batches, plan[len(results)], setup.lr,
                                   loss=setup.loss))

    with with_lora(base, order.lora_r, order.lora_alpha, list(setup.target_modules),
                   order.seed, global_state if order.global_mode == "init" else None,
                   slice_global(frozen, copy.result) if copy else frozen,
                   order.train_lora_a) as model:
        targets = copy.targets if copy else [n for n, m in model.named_modules()
                                             if hasattr(m, "lora_A")]
        training_started, start = time.time(), time.perf_counter()
        done = copy.result if copy else None
        if prune is None:
            tune(model)
        else:
            done = tune_with_probes(model, prune, len(plan) if pruning_now else None, tune,
                                    probe, probes) or done
        seconds = time.perf_counter() - start + probe_seconds
        state = lora_state(model, getattr(torch, setup.wire_dtype))
    if done is not None:  # `base` is the pruned model again, its LoRA removed
        keep_copy(key, PrunedCopy(base, done, targets))
    if not order.train_lora_a:  # the server already holds A: send B only
        state = {k: v for k, v in state.items() if LORA_A not in k}
    metrics = round_metrics(len(examples), results, seconds, order, probes, done)
    metrics["training-started"] = training_started  # wall clock, for the ClientApp's figure
    return RoundResult(state, metrics, kept_arrays(done, targets) if done else {})


def round_metrics(num_examples: int, results: list[TrainResult], seconds: float,
                  order: TrainOrder, probes: dict[str, float],
                  done: PruneResult | None) -> dict[str, float]:
    """The reply's metrics; pruning orders add their probes and what pruning kept."""
    steps = sum(r.steps for r in results)
    metrics = {
        "num-examples": float(num_examples),
        "train-loss": sum(r.loss * r.steps for r in results) / steps,
        "train-seconds": seconds,
        "peak-rss-mb": peak_rss_mb(),
        "lora-r": float(order.lora_r),
    }
    if order.prune is not None:
        metrics.update({
            "loss-before": probes["loss-before"], "loss-after": probes["loss-after"],
            "tune-seconds": sum(r.seconds for r in results),
            "prune-ratio": float(order.prune.ratio),
            "params-ratio": done.params_after / done.params_before if done else 1.0,
            "pruned-before": probes.get("pruned-before", 0.0),  # 1: pruned in an earlier round
        })
        log(INFO, "Probe loss %.4f -> %.4f, parameters kept %.3f, %.1f s",
            probes["loss-before"], probes["loss-after"], metrics["params-ratio"], seconds)
    return metrics

