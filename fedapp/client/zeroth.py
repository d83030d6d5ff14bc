"""A FedKSeed client round: zeroth-order steps on the LoRA's B, two forward passes each.

The message's arrays are the K accumulated scalars C. The client rebuilds the LoRA they
stand for (`strategies.kseed_math.adapter_state`: A fixed from the run's seed, B replayed
from the seeds with C_i ≠ 0), then takes `local_steps` steps, each along the perturbation of
a seed drawn from `seed_probabilities(C)`, and uploads only the (seed index, projected
gradient) pairs. No backward pass and no optimizer state: the peak memory is the base, the
LoRA, one perturbation and a forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from logging import INFO

import torch
from flwr.common.logger import log

from fedapp.client.round import RoundResult, local_data
from fedapp.llm.adapters import target_module_shapes, with_lora
from fedapp.llm.loss import lm_loss
from fedapp.llm.memory import peak_rss_mb
from fedapp.llm.model import cached_base, default_device
from strategies.kseed_math import (
    GRADS,
    SCALARS,
    SEEDS,
    adapter_state,
    perturbation,
    projected_gradient,
    seed_probabilities,
)
from strategies.lora_math import LORA_B
from strategies.protocol import RunSetup, TrainOrder


def lora_b_parameters(model: torch.nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    """{peft module key: its lora_B weight} of a model with one ("default") adapter."""
    by_name = {name.replace(".default", ""): p for name, p in model.named_parameters()}
    missing = [m for m in modules if m + LORA_B not in by_name]
    if missing:
        raise ValueError(f"the LoRA has no lora_B for {missing[:2]}")
    return {m: by_name[m + LORA_B] for m in modules}


@torch.no_grad()
def zo_step(model: torch.nn.Module, params: Mapping[str, torch.Tensor],
            batch: Mapping[str, torch.Tensor], z: Mapping[str, torch.Tensor], eps: float,
            lr: float, loss: str) -> tuple[float, float]:
    """One two-point step along `z`: (projected gradient as sent, mean of the two losses).
    The step applied is the one the server will replay: the gradient rounded to float32."""
    start = {m: p.detach().clone() for m, p in params.items()}
    values = []
    for sign in (1.0, -1.0):
        for m, p in params.items():
            p.copy_(start[m]).add_(z[m].to(p), alpha=sign * eps)
        values.append(float(lm_loss(model, batch, loss)))
    g = float(torch.tensor(projected_gradient(values[0], values[1], eps), dtype=torch.float32))
    for m, p in params.items():
        p.copy_(start[m]).add_(z[m].to(p), alpha=-lr * g)
    return g, (values[0] + values[1]) / 2


def zo_steps(model: torch.nn.Module, params: Mapping[str, torch.Tensor],
             batches: Iterator[dict[str, torch.Tensor]], order: TrainOrder,
             shapes: Mapping[str, tuple[int, int]], probabilities: torch.Tensor,
             generator: torch.Generator, loss: str) -> tuple[list[int], list[float], list[float]]:
    """`order.local_steps` steps: (seed indices, projected gradients, losses)."""
    zo = order.zo
    assert zo is not None
    device = next(iter(params.values())).device
    indices, grads, losses = [], [], []
    start = time.perf_counter()
    for step in range(1, order.local_steps + 1):
        index = int(torch.multinomial(probabilities, 1, generator=generator))
        batch = {k: v.to(device) for k, v in next(batches).items()}
        z = perturbation(shapes, order.lora_r, zo.run_seed, index)
        g, value = zo_step(model, params, batch, z, zo.eps, zo.lr, loss)
        indices.append(index)
        grads.append(g)
        losses.append(value)
        if step % 10 == 0 and step < order.local_steps:
            log(INFO, "  step %d/%d  loss %.4f  (%.2f s/step)", step, order.local_steps,
                value, (time.perf_counter() - start) / step)
    return indices, grads, losses


def zo_round(setup: RunSetup, order: TrainOrder, partition_id: int, num_partitions: int,
             global_state: Mapping[str, torch.Tensor], device: str | None = None
             ) -> RoundResult:
    """Carry out a zeroth-order order (`order.zo`) on this client's partition."""
    device = device or default_device()
    zo = order.zo
    assert zo is not None
    scalars = global_state.get(SCALARS)
    if scalars is None or tuple(scalars.shape) != (zo.seeds,):
        raise ValueError(f"the train message's '{SCALARS}' is "
                         f"{None if scalars is None else tuple(scalars.shape)}; expected "
                         f"({zo.seeds},): one accumulated scalar per candidate seed")
    examples, batches, _ = local_data(setup, order, partition_id, num_partitions)
    base = cached_base(setup.model_path, setup.quantization, device)
    shapes = target_module_shapes(base, list(setup.target_modules))
    replay_start = time.perf_counter()
    state = adapter_state(shapes, order.lora_r, zo.run_seed, scalars, zo.lr)
    replay_seconds = time.perf_counter() - replay_start
    probabilities = seed_probabilities(scalars, zo.sampling)
    generator = torch.Generator().manual_seed(order.seed + 1000 * partition_id)
    log(INFO, "Client %d: %d examples, r=%d, %d zeroth-order steps over %d seeds (%s), "
        "replayed %d seeds in %.2f s", partition_id, len(examples), order.lora_r,
        order.local_steps, zo.seeds, zo.sampling, int(torch.count_nonzero(scalars)),
        replay_seconds)
    with with_lora(base, order.lora_r, order.lora_alpha, list(setup.target_modules),
                   order.seed, init_state=state, train_lora_a=False) as model:
        model.eval()  # the two passes of a step must see the same network (no dropout)
        params = lora_b_parameters(model, sorted(shapes))
        training_started, start = time.time(), time.perf_counter()
        indices, grads, losses = zo_steps(model, params, batches, order, shapes,
                                          probabilities, generator, setup.loss)
        seconds = time.perf_counter() - start
    metrics = {"num-examples": float(len(examples)), "train-loss": sum(losses) / len(losses),
               "train-seconds": seconds, "peak-rss-mb": peak_rss_mb(),
               "lora-r": float(order.lora_r), "replay-seconds": replay_seconds,
               "training-started": training_started}
    upload = {SEEDS: torch.tensor(indices, dtype=torch.int32),
              GRADS: torch.tensor(grads, dtype=torch.float32)}
    return RoundResult(upload, metrics)
