"""Task accuracy without sampling: score every candidate label's likelihood, pick the best.

For a dataset with a label column, each held-out prompt is followed in turn by each label
seen in the training split; the prediction is the label with the highest mean token
log-likelihood (mean, not sum, so that long labels are not penalised). Meaningful when the
response *is* the label (classification data); on the default FAQ it measures whether the
model can name a question's category, which it is never trained to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedapp.llm.data import DataSpec, collate, prompt_and_response, prompt_text
from fedapp.llm.loss import labelled_logprobs


@dataclass(frozen=True)
class ChoiceItem:
    candidates: list[dict]  # one tokenised prompt+label per candidate label
    gold: int  # index of the true label


def build_choice_items(records, spec: DataSpec, labels: list[str], tokenizer,
                       max_length: int) -> list[ChoiceItem]:
    """Tokenise every (held-out record, candidate label) pair once."""
    if not spec.label_column:
        raise ValueError("accuracy needs dataset.label_column")
    items = []
    for record in records:
        prompt = prompt_text(record, spec, tokenizer)
        candidates = [prompt_and_response(prompt, label, tokenizer, max_length)
                      for label in labels]
        items.append(ChoiceItem(candidates, labels.index(str(record[spec.label_column]))))
    return items


def label_logprobs(model: torch.nn.Module, examples: list[dict], pad_token_id: int,
                   batch_size: int) -> list[torch.Tensor]:
    """Each example's log-probabilities of its labelled tokens, in order."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_token_id)
        picked, keep = labelled_logprobs(model, {k: v.to(device) for k, v in batch.items()})
        out += list(picked.cpu().split(keep.sum(dim=1).tolist()))
    return out


def mean_label_logprob(model: torch.nn.Module, examples: list[dict],
                       pad_token_id: int) -> torch.Tensor:
    """Mean log-probability of each example's labelled tokens: (len(examples),)."""
    return torch.stack([t.mean() if t.numel() else t.new_zeros(())
                        for t in label_logprobs(model, examples, pad_token_id, len(examples))])


def choice_accuracy(model: torch.nn.Module, items: list[ChoiceItem], pad_token_id: int,
                    batch_size: int = 16) -> float:
    """Share of items whose true label scores highest."""
    model.eval()
    flat = [c for item in items for c in item.candidates]
    scores = torch.cat([mean_label_logprob(model, flat[i:i + batch_size], pad_token_id)
                        for i in range(0, len(flat), batch_size)]).cpu()
    correct, offset = 0, 0
    for item in items:
        n = len(item.candidates)
        correct += int(int(scores[offset:offset + n].argmax()) == item.gold)
        offset += n
    return correct / len(items)
