"""What the model says: greedy answers to a few held-out prompts, scored by ROUGE-L.

At the end of a run the server answers the first `eval.generate_examples` held-out prompts
greedily with the base model and with the final global adapter, and writes both beside the
references in `<run dir>/generations.json` with each answer's ROUGE-L F1 against its
reference (Google's `rouge-score` package; words are lower-cased runs of Unicode letters and
digits, so that accented text is not split apart). A person can read what the model
learned; the mean ROUGE-L goes into the sweep's comparison.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import torch

from fedapp.llm.data import DataSpec, encode_prompt, prompt_text


class WordTokenizer:
    """rouge-score's tokenizer interface: lower-cased words of any script."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


def rouge_l(answers: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each answer against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=WordTokenizer())
    return [scorer.score(ref, ans)["rougeL"].fmeasure
            for ans, ref in zip(answers, references, strict=True)]


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer, prompts: list[str],
                   max_new_tokens: int) -> list[str]:
    """Each prompt's greedy continuation up to EOS or `max_new_tokens`, decoded."""
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for prompt in prompts:  # one at a time: no padding to get wrong
        ids = torch.tensor([encode_prompt(prompt, tokenizer)])
        out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(
            device), max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def heldout_prompts(records, spec: DataSpec, tokenizer, n: int) -> tuple[list[str], list[str]]:
    """(prompts, reference answers) of the first `n` held-out records."""
    records = [records[i] for i in range(min(n, len(records)))]
    return ([prompt_text(r, spec, tokenizer) for r in records],
            [str(r[spec.response_column]) for r in records])


def write_generations(out: Path, prompts: list[str], references: list[str],
                      answers: dict[str, list[str]]) -> dict[str, float]:
    """Write every prompt's reference and answers ({model name: answers}) with their
    ROUGE-L, and return the mean ROUGE-L per model ("rouge-l-<name>")."""
    scores = {name: rouge_l(texts, references) for name, texts in answers.items()}
    rows = [{"prompt": p, "reference": ref,
             **{f"answer-{name}": answers[name][i] for name in answers},
             **{f"rouge-l-{name}": round(scores[name][i], 4) for name in answers}}
            for i, (p, ref) in enumerate(zip(prompts, references, strict=True))]
    means = {f"rouge-l-{name}": statistics.fmean(s) for name, s in scores.items()}
    out.write_text(json.dumps({**means, "examples": rows}, indent=2, ensure_ascii=False) + "\n")
    return means
