"""scripts/bench_client.py's measuring pieces: bytes of tensors, the activations autograd
keeps, a device's first pruned round (in the client's process or in a helper that stores
the pruned copy, as `fedapp.client.store` does) and a client's peak RSS split into parts."""

from __future__ import annotations

import sys
import time

MiB = 2**20


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(seen.values())


def saved_activation_bytes(model, batch, loss: str) -> int:
    """Bytes autograd keeps from one forward for its backward (distinct storages, the
    frozen weights excluded), then runs that backward."""
    import torch

    from fedapp.llm.loss import lm_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: list = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: kept.append(t) or t, lambda t: t):
        value = lm_loss(model, batch, loss)
    value.backward()
    model.zero_grad(set_to_none=True)
    return tensor_bytes(t for t in kept if t.untyped_storage().data_ptr() not in params)


def worker_prune(quantization: str) -> dict:
    """A device's first pruned round, as far as its base goes: the unpruned base scored on
    a probe batch (Fisher, the default criterion) and pruned to 0.5 in one slice, then stored
    on disk as the client stores it (`fedapp.client.store`); its folder and parameter ratio."""
    from fedapp.client.pruned import PrunedCopy, target_keys
    from fedapp.client.round import local_data
    from fedapp.client.store import store_copy, store_dir
    from fedapp.config import build_strategy, compose_config
    from fedapp.llm.adapters import with_lora
    from fedapp.llm.data import collate
    from fedapp.llm.model import load_base, weights_folder
    from fedapp.pruning.importance import block_costs
    from fedapp.pruning.surgery import iterative_prune
    from fedapp.pruning.units import units_of

    strategy = build_strategy(compose_config(f"model.quantization={quantization}"), {})
    setup, order = strategy.setup, strategy.make_order(1, 8)
    examples, _, pad = local_data(setup, order, 0, 4)
    base = load_base(setup.model_path, quantization, "cpu")
    full, targets = block_costs(base), target_keys(base, setup.target_modules)
    with with_lora(base, 8, order.lora_alpha, list(setup.target_modules), 0) as model:
        done = iterative_prune(model, 0.5, 1, lambda m: None, "fisher",
                               batches=[collate(examples[:setup.batch_size], pad)])
    folder = store_dir(setup.model_path, quantization, "cpu", units_of(base, done))
    if not store_copy(PrunedCopy(base, done, targets, full), folder,
                      weights_folder(setup.model_path, quantization, "cpu")):
        sys.exit(f"the pruned copy was not stored at {folder} (FEDAPP_PRUNED_STORE=0?)")
    return {"folder": str(folder), "params-ratio": done.params_after / done.params_before}


def prune_here(model, batches: list, load: dict) -> float:
    """A device's first pruned round: Fisher scores of the unpruned model on `batches`,
    pruned to 0.5 in one slice; the peak since the load and the seconds go into `load`.
    The parameter ratio."""
    from fedapp.llm import memory
    from fedapp.pruning.surgery import iterative_prune

    start = time.perf_counter()
    done = iterative_prune(model, 0.5, 1, lambda m: None, "fisher", batches=batches)
    load["prune-peak"] = memory.peak_rss_mb()
    load["prune-seconds"] = time.perf_counter() - start
    return done.params_after / done.params_before


def memory_parts(model, rss: dict, activations: float, resident: float,
                 peak: float) -> dict[str, float]:
    """A client's peak RSS split into its parts (MiB; see `print_memory`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    parts = {"imports": rss["imports"], "data": rss["data"] - rss["imports"],
             "weights": tensor_bytes(frozen) / MiB,
             "lora+optim": 4 * tensor_bytes(trainable) / MiB,  # param, grad, exp_avg(_sq)
             "activations": activations}
    parts["resident rest"] = resident - sum(v for k, v in parts.items() if k != "activations")
    parts["step rest"] = peak - resident - activations
    return parts
