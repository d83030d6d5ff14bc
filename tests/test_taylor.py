"""Taylor and Fisher scoring of a batch in parts: what a device's first pruning round runs on
the unpruned model it holds, kept small."""

from __future__ import annotations

import pytest
import torch

from fedapp.llm.model import load_base
from fedapp.pruning.importance import taylor_importance


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

    layer = base.model.layers[1]
    gates, handles = {}, []
    for kind, linear in (("self_attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
        n = importance.units[1, kind].numel()
        gates[kind] = torch.ones(3, 16, n, requires_grad=True)

        def gated(_m, args, gate=gates[kind], n=n):
            return (args[0] * gate.repeat_interleave(args[0].shape[-1] // n, dim=-1),)
        handles.append(linear.register_forward_pre_hook(gated))
    base.zero_grad()
    base(**whole).loss.backward()
    for handle in handles:
        handle.remove()

    for kind, gate in gates.items():
        oracle = gate.grad.square().sum((0, 1))
        assert oracle.min() > 0
        torch.testing.assert_close(importance.units[1, kind], oracle, rtol=1e-4, atol=1e-12)
    first = taylor_importance(base, [whole], rows=rows).units[1, "mlp"]
    assert not torch.allclose(first, importance.units[1, "mlp"])  # not the first-order score
