"""Which of its examples a client trains on (`RunSetup.selection`), chosen on the device
from its own partition: nothing about the data leaves it.

- `all` (default): every example, at no cost.
- `random`: `budget_count(n, budget)` examples drawn with a seeded generator (the baseline).
- `shed`: SHED (`strategies.shed_math`). The base model embeds every example (the mean of
  its last hidden state over the non-pad tokens, unit length, no gradient); k-means groups
  them into `clusters`; a seeded validation slice of `proxy_examples` examples and the
  clusters' representatives give, from forward passes only, the gradients of their loss
  with respect to the output layer's weight (logit-layer gradients: nothing is
  back-propagated); the representatives' Shapley values under the first-order proxy v(S)
  value the clusters, and the best clusters fill the budget, the last one partly.

The choice depends only on the run setup (seed, budget, data, model) and the partition, so
it is made once per machine: the kept indices are written beside the partition's cached
examples (`fedapp.client.partition`), named by everything that decides them, and read
back by every later process (a deployed SuperNode starts one per round) and held per
process (`functools.cache`: a simulation's actors keep them across rounds). Its seconds
are reported once, as `selection-seconds` in the next reply (`selection_metrics`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from functools import cache
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log

from fedapp.client.partition import partition_examples, partition_file
from fedapp.llm.data import IGNORE_INDEX, collate
from fedapp.llm.loss import causal_lm, chunkable_head, softcap_of
from fedapp.llm.model import cached_base, default_device
from strategies.protocol import RunSetup, SelectionSpec
from strategies.shed_math import (
    budget_count,
    check_clusters_fit,
    first_order_value,
    kmeans,
    quality_ordered,
    random_subset,
    representatives,
    shapley_values,
)

DECODE_BATCH = 16  # examples per no-grad forward pass while selecting
_unreported_seconds = 0.0  # spent selecting since the last reply reported it


def selected_examples(setup: RunSetup, num_partitions: int,
                      partition_id: int) -> tuple[list[dict], int]:
    """(the examples of this partition that its selection keeps, the pad token id)."""
    examples, pad = partition_examples(setup, num_partitions, partition_id)
    if setup.selection.method == "all":
        return examples, pad
    return [examples[i] for i in _selection(setup, num_partitions, partition_id)], pad


def selection_metrics() -> dict[str, float]:
    """The reply's `selection-seconds`: what this process spent selecting since the last
    reply (0 in every round after the one that selected)."""
    global _unreported_seconds
    seconds, _unreported_seconds = _unreported_seconds, 0.0
    return {"selection-seconds": seconds}


@cache
def _selection(setup: RunSetup, num_partitions: int, partition_id: int) -> tuple[int, ...]:
    """The kept indices into the partition, once per process and machine (see the module
    docstring)."""
    global _unreported_seconds
    start = time.perf_counter()
    examples, pad = partition_examples(setup, num_partitions, partition_id)
    spec, n = setup.selection, len(examples)
    saved = selection_file(setup, num_partitions, partition_id)
    if saved.exists():
        kept = json.loads(saved.read_text())
    else:
        kept = choose(setup, examples, pad, partition_id)
        tmp = saved.with_name(f"{saved.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(kept))
        tmp.rename(saved)  # atomic: a process racing to the same file writes the same
    seconds = time.perf_counter() - start
    _unreported_seconds += seconds
    log(INFO, "Client %d: %s selection kept %d of %d examples (budget %g%s) in %.1f s",
        partition_id, spec.method, len(kept), n, spec.budget,
        f", {spec.clusters} clusters" if spec.method == "shed" else "", seconds)
    return tuple(kept)


def choose(setup: RunSetup, examples: list[dict], pad: int, partition_id: int) -> list[int]:
    """The sorted indices of `examples` that `setup.selection` keeps, drawing its random
    numbers from the run's seed and the partition id only."""
    spec, n = setup.selection, len(examples)
    generator = torch.Generator().manual_seed(setup.data.seed + 1000 * partition_id)
    if spec.method == "random":
        return random_subset(n, budget_count(n, spec.budget), generator)
    check_clusters_fit(spec.clusters, {partition_id: n})
    base = cached_base(setup.model_path, setup.quantization, default_device())
    return shed_indices(base, examples, pad, spec, setup.lr, generator)


def selection_file(setup: RunSetup, num_partitions: int, partition_id: int) -> Path:
    """Where this partition's kept indices are kept: beside its examples, named by the
    partition's file and everything else of the setup (selection, model, batch size, lr)."""
    examples = partition_file(setup, num_partitions, partition_id)
    digest = hashlib.sha256(json.dumps(setup.to_dict(), sort_keys=True).encode()).hexdigest()
    return examples.with_name(f"{examples.stem}-selection-{digest[:20]}.json")


def shed_indices(model: torch.nn.Module, examples: list[dict], pad: int, spec: SelectionSpec,
                 lr: float, generator: torch.Generator) -> list[int]:
    """SHED's choice of `budget_count(n, spec.budget)` of `examples` (sorted indices)."""
    n = len(examples)
    if spec.budget >= 1:  # every cluster is kept whole: no need to value them
        return list(range(n))
    points = torch.nn.functional.normalize(embed(model, examples, pad), dim=1)
    centroids, labels = kmeans(points, spec.clusters, generator)
    validation = torch.randperm(n, generator=generator)[:spec.proxy_examples]
    players = representatives(points, centroids, labels, avoid=validation)
    alignment = head_gradient_alignment(model, [examples[i] for i in validation.tolist()],
                                        [examples[i] for i in players], pad)
    values = shapley_values(first_order_value(alignment.tolist(), lr), len(players),
                            spec.permutations, generator)
    return quality_ordered(labels, values, budget_count(n, spec.budget), generator)


@torch.no_grad()
def last_hidden_states(model: torch.nn.Module, examples: list[dict],
                       pad: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, last hidden states (len, hidden) over its own tokens) of every example, in
    eval mode, no gradient. Decoded `DECODE_BATCH` at a time in order of length (little
    padding); the 4-bit weights are dequantised once per call, so large batches pay off,
    and the decoder alone holds little (no logits)."""
    decoder = causal_lm(model).get_decoder()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), DECODE_BATCH):
            rows = order[start:start + DECODE_BATCH]
            batch = collate([examples[i] for i in rows], pad)
            hidden = decoder(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)
                             ).last_hidden_state.float()  # (b, len, hidden), right-padded
            for row, i in enumerate(rows):
                yield i, hidden[row, :len(examples[i]["input_ids"])]
    finally:
        model.train(was_training)


def embed(model: torch.nn.Module, examples: list[dict], pad: int) -> torch.Tensor:
    """(n, hidden) mean of each example's last hidden state over its non-pad tokens."""
    points = torch.empty(len(examples), causal_lm(model).config.hidden_size)
    for i, hidden in last_hidden_states(model, examples, pad):
        points[i] = hidden.mean(dim=0).cpu()
    return points


def logit_gradient_factors(model: torch.nn.Module, head: torch.nn.Linear, example: dict,
                           hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E (T, vocab), H (T, hidden)) over the example's T labelled tokens, from its last
    hidden states (len, hidden), such that the gradient of its summed token losses with
    respect to the output layer's weight is Eᵀ H: E = dL/dlogits (softmax − one-hot,
    soft-capping's derivative applied), H the hidden states that predict those tokens."""
    labels = torch.tensor(example["labels"][1:], device=hidden.device)
    keep = labels != IGNORE_INDEX
    h, y = hidden[:-1][keep], labels[keep]  # (T, hidden), (T,)
    logits = h @ head.weight.float().T  # (T, hidden) @ (hidden, vocab) -> (T, vocab)
    softcap = softcap_of(model)
    squash = None
    if softcap is not None:
        squash = torch.tanh(logits / softcap)
        logits = softcap * squash
    e = torch.softmax(logits, dim=-1)
    e[torch.arange(len(y), device=e.device), y] -= 1.0
    if squash is not None:
        e *= 1.0 - squash ** 2  # d(c·tanh(u/c))/du
    return e, h


@torch.no_grad()
def head_gradient_alignment(model: torch.nn.Module, validation: list[dict],
                            players: list[dict], pad: int) -> torch.Tensor:
    """(players,) <g_val, g_i>: g_val the output-layer gradient of the validation slice's
    mean token loss, g_i that of player i's own mean token loss. Forward passes only."""
    head = chunkable_head(model)
    if head is None:
        raise ValueError("train.selection='shed' needs a frozen plain linear output head "
                         f"(the logit-layer gradients); {type(causal_lm(model)).__name__} "
                         "has another; allowed: train.selection=random or all")
    g_val = torch.zeros_like(head.weight, dtype=torch.float32)  # (vocab, hidden)
    tokens = 0
    for i, hidden in last_hidden_states(model, validation, pad):
        e, h = logit_gradient_factors(model, head, validation[i], hidden)
        g_val += e.T @ h  # (vocab, T) @ (T, hidden) -> (vocab, hidden)
        tokens += len(h)
    g_val /= tokens
    out = torch.empty(len(players))
    for i, hidden in last_hidden_states(model, players, pad):
        e, h = logit_gradient_factors(model, head, players[i], hidden)
        # <g_val, Eᵀ H / T> = sum(E ⊙ (H g_valᵀ)) / T: (T, hidden) @ (hidden, vocab)
        out[i] = float((e * (h @ g_val.T)).sum()) / len(h)
    return out
