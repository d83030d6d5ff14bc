"""Which of its examples a client trains on (`RunSetup.selection`), chosen on the device
from its own partition: nothing about the data leaves it.

- `all` (default): every example, at no cost.
- `random`: `budget_count(n, budget)` examples drawn with a seeded generator (the baseline).
- `shed`: SHED (`strategies.shed_math`). The base model embeds every example (the mean of
  its last hidden state over the non-pad tokens, unit length, no gradient); k-means groups
  them into `clusters`; a seeded validation slice of `proxy_examples` examples and the
  clusters' representatives give, from one forward pass each, the gradients of their loss
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
    elif spec.method == "random":
        kept = random_subset(n, budget_count(n, spec.budget), _generator(setup, partition_id))
    else:
        check_clusters_fit(spec.clusters, {partition_id: n})
        base = cached_base(setup.model_path, setup.quantization, default_device())
        kept = shed_indices(base, examples, pad, spec, setup.batch_size, setup.lr,
                            _generator(setup, partition_id))
    if not saved.exists():
        tmp = saved.with_name(f"{saved.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(kept))
        tmp.rename(saved)
    seconds = time.perf_counter() - start
    _unreported_seconds += seconds
    log(INFO, "Client %d: %s selection kept %d of %d examples (budget %g%s) in %.1f s",
        partition_id, spec.method, len(kept), n, spec.budget,
        f", {spec.clusters} clusters" if spec.method == "shed" else "", seconds)
    return tuple(kept)


def _generator(setup: RunSetup, partition_id: int) -> torch.Generator:
    """The selection's random numbers: the run's seed and the partition, nothing else."""
    return torch.Generator().manual_seed(setup.data.seed + 1000 * partition_id)


def selection_file(setup: RunSetup, num_partitions: int, partition_id: int) -> Path:
    """Where this partition's kept indices are kept: beside its examples, named by the
    partition's file and everything else of the setup (selection, model, batch size, lr)."""
    examples = partition_file(setup, num_partitions, partition_id)
    digest = hashlib.sha256(json.dumps(setup.to_dict(), sort_keys=True).encode()).hexdigest()
    return examples.with_name(f"{examples.stem}-selection-{digest[:20]}.json")


def shed_indices(model: torch.nn.Module, examples: list[dict], pad: int, spec: SelectionSpec,
                 batch_size: int, lr: float, generator: torch.Generator) -> list[int]:
    """SHED's choice of `budget_count(n, spec.budget)` of `examples` (sorted indices)."""
    n = len(examples)
    if spec.budget >= 1:  # every cluster is kept whole: no need to value them
        return list(range(n))
    points = torch.nn.functional.normalize(embed(model, examples, pad, batch_size), dim=1)
    centroids, labels = kmeans(points, spec.clusters, generator)
    validation = torch.randperm(n, generator=generator)[:spec.proxy_examples]
    players = representatives(points, centroids, labels, avoid=validation)
    alignment = head_gradient_alignment(model, [examples[i] for i in validation.tolist()],
                                        [examples[i] for i in players], pad)
    values = shapley_values(first_order_value(alignment.tolist(), lr), len(players),
                            spec.permutations, generator)
    return quality_ordered(labels, values, budget_count(n, spec.budget), generator)


@torch.no_grad()
def embed(model: torch.nn.Module, examples: list[dict], pad: int,
          batch_size: int) -> torch.Tensor:
    """(n, hidden) mean of each example's last hidden state over its non-pad tokens."""
    decoder = causal_lm(model).get_decoder()
    device = next(model.parameters()).device
    was_training, rows = model.training, []
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad)
        mask = batch["attention_mask"].to(device)
        hidden = decoder(input_ids=batch["input_ids"].to(device),
                         attention_mask=mask).last_hidden_state.float()  # (b, len, hidden)
        weights = mask[..., None].float()  # (b, len, 1)
        rows.append((hidden * weights).sum(dim=1) / weights.sum(dim=1))
    model.train(was_training)
    return torch.cat(rows).cpu()


@torch.no_grad()
def logit_gradient_factors(model: torch.nn.Module, example: dict,
                           pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(E (T, vocab), H (T, hidden)) over the example's T labelled tokens, such that the
    gradient of the summed token losses with respect to the output layer's weight is
    Eᵀ H: E = dL/dlogits (softmax − one-hot, soft-capping's derivative applied), H the
    last hidden states. One forward pass, no backward."""
    head = chunkable_head(model)
    if head is None:
        raise ValueError("train.selection='shed' needs a frozen plain linear output head "
                         f"(the logit-layer gradients); {type(causal_lm(model)).__name__} "
                         "has another; allowed: train.selection=random or all")
    device = head.weight.device
    batch = collate([example], pad)
    hidden = causal_lm(model).get_decoder()(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device)).last_hidden_state[0, :-1]
    labels = batch["labels"][0, 1:].to(device)
    keep = labels != IGNORE_INDEX
    h, y = hidden[keep].float(), labels[keep]  # (T, hidden), (T,)
    logits = h @ head.weight.float().T  # (T, hidden) @ (hidden, vocab) -> (T, vocab)
    softcap = softcap_of(model)
    squash = None
    if softcap is not None:
        squash = torch.tanh(logits / softcap)
        logits = softcap * squash
    e = torch.softmax(logits, dim=-1)
    e[torch.arange(len(y), device=device), y] -= 1.0
    if squash is not None:
        e *= 1.0 - squash ** 2  # d(c·tanh(u/c))/du
    return e, h


def head_gradient_alignment(model: torch.nn.Module, validation: list[dict],
                            players: list[dict], pad: int) -> torch.Tensor:
    """(players,) <g_val, g_i>: g_val the output-layer gradient of the validation slice's
    mean token loss, g_i that of player i's own mean token loss."""
    was_training = model.training
    model.eval()
    g_val, tokens = None, 0
    for example in validation:
        e, h = logit_gradient_factors(model, example, pad)
        g = e.T @ h  # (vocab, T) @ (T, hidden) -> (vocab, hidden)
        g_val = g if g_val is None else g_val + g
        tokens += len(h)
    assert g_val is not None  # proxy_examples >= 1 and every example has a labelled token
    g_val /= tokens
    out = []
    for example in players:
        e, h = logit_gradient_factors(model, example, pad)
        # <g_val, Eᵀ H / T> = sum(E ⊙ (H g_valᵀ)) / T: (T, hidden) @ (hidden, vocab)
        out.append(float((e * (h @ g_val.T)).sum()) / len(h))
    model.train(was_training)
    return torch.tensor(out)
