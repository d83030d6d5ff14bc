"""Server side of the model: held-out evaluation and export of the global adapter.

The global model is always expressed as one standard peft LoRA (state, r, lora_alpha), so
what the server evaluates is exactly what `PeftModel.from_pretrained` loads from the export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import torch

from fedapp.llm.adapters import adapter_targets, with_lora
from fedapp.llm.data import DataSpec, load_split, tokenize_records
from fedapp.llm.train import eval_loss
from fedapp.server.accuracy import ChoiceItem, build_choice_items, choice_accuracy
from fedapp.server.generate import greedy_answers, heldout_prompts, write_generations
from fedapp.server.ranking import RankingSet, build_ranking_items, ranking_metrics


def heldout_examples(spec: DataSpec, tokenizer, max_length: int, max_examples: int) -> list[dict]:
    """The tokenised held-out test split (the first `max_examples`, 0 = all)."""
    _, test = load_split(spec)
    if max_examples:
        test = test.select(range(min(max_examples, len(test))))
    return tokenize_records(test, spec, tokenizer, max_length)


def _global_lora(base: torch.nn.Module, state: Mapping[str, torch.Tensor], r: int,
                 lora_alpha: float):
    if not state:
        return nullcontext(base)
    return with_lora(base, r, lora_alpha, adapter_targets(state), seed=0, init_state=state)


def heldout_choice_items(spec: DataSpec, tokenizer, max_length: int,
                         max_examples: int) -> list[ChoiceItem]:
    """Held-out records paired with every label of the training split, for accuracy."""
    train, test = load_split(spec)
    labels = sorted({str(v) for v in train[spec.label_column]})
    test = test.select(range(min(max_examples, len(test))))
    return build_choice_items(test, spec, labels, tokenizer, max_length)


def heldout_ranking_items(spec: DataSpec, tokenizer, max_length: int, questions: int,
                          k: int, score: str) -> RankingSet:
    """The first `questions` held-out records, each with `k` other held-out answers drawn
    by the run's seed (`fedapp.server.ranking`)."""
    _, test = load_split(spec)
    return build_ranking_items(test, spec, tokenizer, max_length, questions, k, spec.seed,
                               score)


def evaluate_adapter(base: torch.nn.Module, state: Mapping[str, torch.Tensor], r: int,
                     lora_alpha: float, examples: list[dict], batch_size: int,
                     pad_token_id: int, choice_items: list[ChoiceItem] | None = None,
                     ranking_items: RankingSet | None = None) -> dict[str, float]:
    """Held-out loss and perplexity of base + adapter (an empty state means the base),
    answer-ranking accuracy and MRR when `ranking_items` are given, and label accuracy when
    `choice_items` are."""
    with _global_lora(base, state, r, lora_alpha) as model:
        loss = eval_loss(model, examples, batch_size, pad_token_id)
        metrics = {"eval-loss": loss, "eval-ppl": math.exp(min(loss, 50.0))}
        if ranking_items:
            metrics.update(ranking_metrics(model, ranking_items, pad_token_id, batch_size))
        if choice_items:
            metrics["eval-accuracy"] = choice_accuracy(model, choice_items, pad_token_id,
                                                       batch_size)
    return metrics


def generation_report(base: torch.nn.Module, state: Mapping[str, torch.Tensor], r: int,
                      lora_alpha: float, spec: DataSpec, tokenizer, examples: int,
                      max_new_tokens: int, out: Path) -> dict[str, float]:
    """Greedy answers of the base and of base + adapter to the first `examples` held-out
    prompts, written with their ROUGE-L to `out` (`fedapp.server.generate`); the means."""
    _, test = load_split(spec)
    prompts, references = heldout_prompts(test, spec, tokenizer, examples)
    answers = {"base": greedy_answers(base, tokenizer, prompts, max_new_tokens)}
    with _global_lora(base, state, r, lora_alpha) as model:
        answers["final"] = greedy_answers(model, tokenizer, prompts, max_new_tokens)
    return write_generations(out, prompts, references, answers)


def export_adapter(base: torch.nn.Module, state: Mapping[str, torch.Tensor], r: int,
                   lora_alpha: float, out_dir: Path, base_name: str) -> Path:
    """Write the global adapter as a standard peft folder; `PeftModel.from_pretrained` loads it."""
    if not state:
        raise ValueError("no global adapter to export: no round produced an update")
    with _global_lora(base, state, r, lora_alpha) as model:
        model.peft_config["default"].base_model_name_or_path = base_name
        model.save_pretrained(out_dir)
    return out_dir
