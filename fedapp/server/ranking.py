"""Answer-ranking accuracy: does the model prefer a question's own answer to other answers?

For each held-out question its true answer and `k` answers of other held-out records (distinct
texts, drawn once from the run's seed, so every round and every strategy of that seed scores
the same candidates) follow the question's prompt. A candidate's score is the mean
log-probability of its answer tokens (the held-out loss's length normalisation), and with
`score="pmi"` (the default) minus the mean log-probability of the same tokens after the same
prompt template without the question. The conditional score alone mostly ranks the answers'
own likelihood: a short generic answer beats the right one whatever the question (measured
on the default run: 0.41 of the held-out questions right before training and after);
subtracting the question-less score leaves how much the *question* raises each answer.

A question counts as correct when its true answer scores strictly above every other
candidate; its rank is 1 + the number of other candidates scoring at least as high (a tie is
never a win), and the mean reciprocal rank averages 1/rank. Chance level: 1/(k+1).

Unlike label accuracy (`fedapp.server.accuracy`) this needs no label column: it measures what
instruction tuning teaches, answering the question asked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fedapp.llm.data import IGNORE_INDEX, DataSpec, prompt_and_response, prompt_text
from fedapp.server.accuracy import label_logprobs

SCORES = ("pmi", "conditional")


@dataclass(frozen=True)
class RankingItem:
    candidates: list[dict]  # tokenised prompt + answer; the true answer first
    answers: list[int]  # each candidate's answer: its index in RankingSet.bare


@dataclass(frozen=True)
class RankingSet:
    items: list[RankingItem]
    bare: list[dict]  # every answer used, after the prompt template without a question
    score: str = "pmi"  # one of SCORES


def draw_distractors(answers: list[str], k: int, seed: int) -> list[list[int]]:
    """For every answer, the indices of `k` other records whose answers differ from it and
    from each other (the first occurrence of each text in a seeded shuffle)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"eval.ranking_k={k!r}; allowed: an integer >= 1")
    if k > len(answers) - 1:
        raise ValueError(f"eval.ranking_k={k} but the held-out split has {len(answers)} "
                         f"records; allowed: at most {len(answers) - 1}")
    distinct = len(set(answers))
    if distinct < k + 1:
        raise ValueError(f"eval.ranking_k={k} needs {k + 1} distinct held-out answers, the "
                         f"dataset has {distinct}; allowed: at most {distinct - 1} (or "
                         "eval.ranking_examples=0 to turn ranking off)")
    rng = random.Random(seed)
    drawn = []
    for answer in answers:
        pool = list(range(len(answers)))
        rng.shuffle(pool)
        chosen: dict[str, int] = {}
        for j in pool:
            if answers[j] != answer and answers[j] not in chosen:
                chosen[answers[j]] = j
                if len(chosen) == k:
                    break
        drawn.append(list(chosen.values()))
    return drawn


def rank_scores(scores: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean reciprocal rank from (questions, k + 1) scores, true answer in
    column 0."""
    true = scores[:, :1]
    ranks = 1 + (scores[:, 1:] >= true).sum(dim=1)
    return {"eval-rank-accuracy": float((ranks == 1).float().mean()),
            "eval-rank-mrr": float((1.0 / ranks.double()).mean())}


def build_ranking_items(records, spec: DataSpec, tokenizer, max_length: int, questions: int,
                        k: int, seed: int, score: str = "pmi") -> RankingSet:
    """The first `questions` held-out records, each with its true answer and `k` drawn
    from all held-out records; a question whose prompt leaves no room within `max_length`
    for an answer token is skipped (every candidate would score the same)."""
    if score not in SCORES:
        raise ValueError(f"eval.ranking_score={score!r}; allowed: {list(SCORES)}")
    answers = [str(r[spec.response_column]) for r in records]
    drawn = draw_distractors(answers, k, seed)
    bare_prompt = prompt_text({spec.instruction_column: ""}, spec, tokenizer)
    bare: dict[int, dict] = {}
    items = []
    for i in range(min(questions, len(answers))):
        prompt = prompt_text(records[i], spec, tokenizer)
        chosen = [i, *drawn[i]]
        candidates = [prompt_and_response(prompt, answers[j], tokenizer, max_length)
                      for j in chosen]
        if any(IGNORE_INDEX == c["labels"][-1] for c in candidates):
            continue
        for j in chosen:
            if j not in bare:
                bare[j] = prompt_and_response(bare_prompt, answers[j], tokenizer, max_length)
        items.append(RankingItem(candidates, chosen))
    if not items:
        raise ValueError(f"train.max_length={max_length} leaves no answer token after any "
                         "held-out prompt; allowed: a longer max_length")
    order = {j: n for n, j in enumerate(bare)}
    items = [RankingItem(it.candidates, [order[j] for j in it.answers]) for it in items]
    return RankingSet(items, list(bare.values()), score)


def ranking_metrics(model: torch.nn.Module, ranking: RankingSet, pad_token_id: int,
                    batch_size: int) -> dict[str, float]:
    """Answer-ranking accuracy and MRR of `model`. A PMI score subtracts the question-less
    log-probabilities of the same answer tokens (those the candidate kept after truncation)."""
    model.eval()
    flat = [c for item in ranking.items for c in item.candidates]
    conditional = iter(label_logprobs(model, flat, pad_token_id, batch_size))
    bare = (label_logprobs(model, ranking.bare, pad_token_id, batch_size)
            if ranking.score == "pmi" else None)
    scores = []
    for item in ranking.items:
        row = []
        for answer in item.answers:
            logp = next(conditional)
            reference = bare[answer][:len(logp)].mean() if bare is not None else 0.0
            row.append(float(logp.mean() - reference))
        scores.append(row)
    return rank_scores(torch.tensor(scores, dtype=torch.float64))
