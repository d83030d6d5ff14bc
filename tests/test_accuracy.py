"""Label accuracy by likelihood: against a stub model whose preferences are known."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from fedapp.llm.data import DataSpec, prompt_and_response
from fedapp.server.accuracy import build_choice_items, choice_accuracy, mean_label_logprob

SPEC = DataSpec(path="unused", instruction_column="q", response_column="a",
                label_column="label")


class BiasModel(torch.nn.Module):
    """Same next-token distribution at every position: softmax(bias)."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(bias)

    def forward(self, input_ids, attention_mask=None):
        logits = self.bias.expand(*input_ids.shape, -1)
        return type("Out", (), {"logits": logits})()


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_mean_label_logprob_averages_only_the_label_tokens(tokenizer):
    bias = torch.randn(1024)
    ex = prompt_and_response("### Instruction:\nwhat\n\n### Response:\n", "permit", tokenizer, 64)

    got = mean_label_logprob(BiasModel(bias), [ex], tokenizer.pad_token_id)

    label_ids = [t for t in ex["labels"] if t != -100]
    expected = torch.log_softmax(bias, -1)[label_ids].mean()
    torch.testing.assert_close(got[0], expected)


def test_accuracy_counts_items_whose_true_label_scores_best(tokenizer):
    labels = ["permit", "roof", "tax"]
    favourite = tokenizer("roof", add_special_tokens=False)["input_ids"]
    bias = torch.zeros(1024)
    bias[favourite] = 8.0  # the stub model always prefers "roof"
    records = [{"q": "a?", "a": "", "label": "roof"}, {"q": "b?", "a": "", "label": "tax"},
               {"q": "c?", "a": "", "label": "roof"}, {"q": "d?", "a": "", "label": "permit"}]

    items = build_choice_items(records, SPEC, labels, tokenizer, 64)
    accuracy = choice_accuracy(BiasModel(bias), items, tokenizer.pad_token_id, batch_size=5)

    assert [i.gold for i in items] == [1, 2, 1, 0]
    assert len(items[0].candidates) == 3
    assert accuracy == 0.5


def test_accuracy_needs_a_label_column(tokenizer):
    with pytest.raises(ValueError, match="label_column"):
        build_choice_items([], DataSpec(label_column=""), ["x"], tokenizer, 8)
