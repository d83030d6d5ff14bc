"""Taylor scoring of a batch in parts: what a device's first pruning round runs on the
unpruned model it holds, kept small."""

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
