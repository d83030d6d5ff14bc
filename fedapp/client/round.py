"""One client's local round, free of Flower: base + global state + fresh LoRA → trained LoRA.

`client_app.py` wraps this in a ClientApp; the benchmark and tests call it directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from functools import cache
from logging import INFO

import torch
from flwr.common.logger import log

from fedapp.llm.adapters import frozen_delta, lora_state, with_lora
from fedapp.llm.data import DataSpec, load_partition, tokenize_records, train_batches
from strategies.protocol import GLOBAL_MODES, WIRE_DTYPES, TrainInstructions
from fedapp.llm.model import cached_base, cached_tokenizer, default_device
from fedapp.llm.train import peak_rss_mb, train_steps
from strategies.lora_math import LORA_A


@cache
def partition_examples(spec: DataSpec, model_path: str, max_length: int, partitioner: str,
                       num_partitions: int, partition_id: int, alpha: float) -> list[dict]:
    """This client's tokenised training examples, computed once per process."""
    records = load_partition(spec, partitioner, num_partitions, partition_id, alpha)
    return tokenize_records(records, spec, cached_tokenizer(model_path), max_length)


def check_instructions(inst: TrainInstructions) -> None:
    """Refuse orders that cannot be carried out, naming the key."""
    if inst.lora_r <= 0:
        raise ValueError(f"lora-r={inst.lora_r}; allowed: a positive integer")
    if inst.lr <= 0:
        raise ValueError(f"lr={inst.lr}; allowed: > 0")
    if inst.local_steps <= 0:
        raise ValueError(f"local-steps={inst.local_steps}; allowed: a positive integer")
    if inst.global_mode not in GLOBAL_MODES:
        raise ValueError(f"global-mode={inst.global_mode!r}; allowed: {list(GLOBAL_MODES)}")
    if inst.wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire-dtype={inst.wire_dtype!r}; allowed: {list(WIRE_DTYPES)}")


def local_data(inst: TrainInstructions, partition_id: int, num_partitions: int
               ) -> tuple[list[dict], Iterator[dict[str, torch.Tensor]], int]:
    """Apply the thread count; (this client's examples, its endless batches, pad token id)."""
    if inst.num_threads > 0:
        torch.set_num_threads(inst.num_threads)
    examples = partition_examples(inst.data, inst.model_path, inst.max_length, inst.partitioner,
                                  num_partitions, partition_id, inst.partitioner_alpha)
    pad = cached_tokenizer(inst.model_path).pad_token_id
    return examples, train_batches(examples, inst.batch_size, pad,
                                   seed=inst.seed + 1000 * partition_id), pad


def run_round(inst: TrainInstructions, partition_id: int, num_partitions: int,
              global_state: Mapping[str, torch.Tensor],
              device: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train a LoRA on this client's partition; return (adapter state, metrics)."""
    check_instructions(inst)
    device = device or default_device()
    examples, batches, _ = local_data(inst, partition_id, num_partitions)
    base = cached_base(inst.model_path, inst.quantization, device)
    init = global_state if inst.global_mode == "init" else None
    with ExitStack() as stack:
        if inst.global_mode == "frozen" and global_state:
            stack.enter_context(frozen_delta(base, global_state, inst.global_scaling))
        model = stack.enter_context(with_lora(base, inst.lora_r, inst.lora_alpha,
                                              list(inst.target_modules), inst.seed, init))
        if not inst.train_lora_a:
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.requires_grad_(False)
        log(INFO, "Client %d: %d examples, r=%d, %d steps", partition_id, len(examples),
            inst.lora_r, inst.local_steps)
        training_started = time.time()
        result = train_steps(model, batches, inst.local_steps, inst.lr)
        state = lora_state(model, getattr(torch, inst.wire_dtype))
        if not inst.train_lora_a:  # the server already holds A: send B only
            state = {k: v for k, v in state.items() if LORA_A not in k}
    metrics = {
        "num-examples": float(len(examples)),
        "train-loss": result.loss,
        "train-seconds": result.seconds,
        "peak-rss-mb": peak_rss_mb(),
        "lora-r": float(inst.lora_r),
        "training-started": training_started,  # wall clock, for the caller's overhead figure
    }
    return state, metrics
