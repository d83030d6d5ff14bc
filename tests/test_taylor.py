"""Taylor and Fisher scoring of a batch in parts: what a device's first pruning round runs on
the unpruned model it holds, kept small."""

from __future__ import annotations

import pytest
import torch

from fedapp.llm.adapters import attach_lora
from fedapp.llm.model import load_base
from fedapp.pruning import surgery
from fedapp.pruning.importance import ImportanceTracker, score, taylor_importance

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_taylor_scores_a_batch_in_parts_as_the_whole_batch(tiny_model_dir, rows):
    """Rows of unequal length (padding) and unequal labelled tokens (a masked prompt): the
    parts' losses weighted by their labelled tokens give the whole batch's |Σ g·w|."""
    base = load_base(str(tiny_model_dir), "none", "cpu").requires_grad_(True)
    ids = torch.randint(1, 1024, (3, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 10:] = mask[2, 5:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :9] = -100  # a prompt: 6 labelled tokens in row 0, 9 in row 1, 4 in row 2
    whole = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    base(**whole).loss.backward()  # the plain loss of the whole batch: the oracle
    down = base.model.layers[0].mlp.down_proj
    oracle = (down.weight.grad * down.weight).sum(0).abs()
    base.zero_grad()

    importance = taylor_importance(base, [whole], rows=rows)

    torch.testing.assert_close(importance.units[0, "mlp"], oracle, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rows", [1, 3])
def test_fisher_scores_are_the_summed_squared_gradients_of_per_position_gates(tiny_model_dir,
                                                                             rows):
    """The oracle gates each unit's activation at each token position (o_proj's input per
    KV group, down_proj's per MLP channel group) by a tensor of ones and sums the squares of
    the gates' gradients: what `fisher` computes from activations × gradients."""
    base = load_base(str(tiny_model_dir), "none", "cpu").requires_grad_(True)
    ids = torch.randint(1, 1024, (3, 16), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    whole = {"input_ids": ids, "attention_mask": mask,
             "labels": ids.masked_fill(mask == 0, -100)}
    importance = taylor_importance(base, [whole], rows=rows, second_order=True)

    gates = gated_backward(base, whole, importance.units, layer=1)
    for kind, gate in gates.items():
        oracle = gate.grad.square().sum((0, 1))
        assert oracle.min() > 0
        torch.testing.assert_close(importance.units[1, kind], oracle, rtol=1e-4, atol=1e-12)
    first = taylor_importance(base, [whole], rows=rows).units[1, "mlp"]
    assert not torch.allclose(first, importance.units[1, "mlp"])  # not the first-order score


def gated_backward(model: torch.nn.Module, batch: dict, units: dict, layer: int) -> dict:
    """The oracle's gates of `layer` ({kind: (batch, seq, units) ones}) after one backward
    pass of `batch`'s loss through `model` (a base or a peft model)."""
    block = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = block.model.layers[layer]
    gates, handles = {}, []
    for kind, linear in (("self_attn", decoder.self_attn.o_proj),
                         ("mlp", decoder.mlp.down_proj)):
        n = units[layer, kind].numel()
        gates[kind] = torch.ones(*batch["input_ids"].shape, n, requires_grad=True)

        def gated(_m, args, gate=gates[kind], n=n):
            return (args[0] * gate.repeat_interleave(args[0].shape[-1] // n, dim=-1),)
        handles.append(linear.register_forward_pre_hook(gated))
    model.zero_grad()
    try:
        model(**batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return gates


def test_the_fisher_tracker_scores_4bit_lora_training_as_the_gates_do(tiny_model_dir):
    """During training (4-bit base, LoRA): the tracker's second-order score is the summed
    squared gradients of per-position gates, the oracle's."""
    model = attach_lora(load_base(str(tiny_model_dir), "nf4", "cpu"), 4, 8, TARGETS, seed=0)
    model.train()
    ids = torch.randint(1, 1024, (2, 12), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with ImportanceTracker(model, second_order=True) as tracker:
        model(**batch).loss.backward()
        tracker.step()
    scores = tracker.importance().units
    gates = gated_backward(model, batch, scores, layer=0)
    for kind, gate in gates.items():
        assert gate.grad.square().sum((0, 1)).min() > 0  # every unit scored
        torch.testing.assert_close(scores[0, kind], gate.grad.square().sum((0, 1)),
                                   rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_the_criterion_name_picks_the_order_in_scoring_and_in_training(
        tiny_model_dir, monkeypatch, criterion):
    base = load_base(str(tiny_model_dir), "none", "cpu").requires_grad_(True)
    ids = torch.randint(1, 1024, (2, 12), generator=torch.Generator().manual_seed(9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fisher = criterion == "fisher"
    expected = taylor_importance(base, [batch], second_order=fisher).units
    other = taylor_importance(base, [batch], second_order=not fisher).units
    scored = score(base, criterion, [batch]).units
    for key, scores in scored.items():
        torch.testing.assert_close(scores, expected[key])
    assert not torch.allclose(scored[0, "mlp"], other[0, "mlp"])

    orders = []  # the order of every tracker iterative_prune builds for the tuning runs

    class Recording(ImportanceTracker):
        def __init__(self, model, beta=0.9, second_order=False):
            orders.append(second_order)
            super().__init__(model, beta, second_order)
    monkeypatch.setattr(surgery, "ImportanceTracker", Recording)
    model = attach_lora(base.requires_grad_(False), 4, 8, TARGETS, seed=0)

    def tune(m: torch.nn.Module) -> None:
        m(input_ids=ids, labels=ids).loss.backward()
        m.zero_grad()
    surgery.iterative_prune(model, 0.5, 2, tune, criterion)  # no batches: tuning scores
    assert orders == [fisher, fisher]  # the extra run before slice 1, the run after it
