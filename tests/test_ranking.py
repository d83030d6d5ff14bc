"""Answer-ranking accuracy: the draw, the rank arithmetic and the scoring of a stub model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from fedapp.llm.data import DataSpec
from fedapp.server.ranking import (
    build_ranking_items,
    draw_distractors,
    rank_scores,
    ranking_metrics,
)
from tests.test_accuracy import BiasModel

SPEC = DataSpec(path="unused", instruction_column="q", response_column="a")


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_distractors_are_other_distinct_answers_and_fixed_by_seed():
    answers = ["a", "b", "a", "c", "d", "b"]

    drawn = draw_distractors(answers, 2, seed=7)

    assert drawn == draw_distractors(answers, 2, seed=7)
    assert drawn != draw_distractors(answers, 2, seed=8)
    for i, picks in enumerate(drawn):
        texts = [answers[j] for j in picks]
        assert len(picks) == 2 and len(set(texts)) == 2 and answers[i] not in texts


def test_rank_of_the_true_answer_counts_ties_against_it():
    scores = torch.tensor([[-1.0, -2.0, -3.0],   # first: rank 1
                           [-2.0, -1.0, -3.0],   # one above: rank 2
                           [-2.0, -2.0, -1.0],   # a tie and one above: rank 3
                           [-1.0, -1.0, -5.0]])  # a tie only: rank 2, not a win

    metrics = rank_scores(scores)

    assert metrics["eval-rank-accuracy"] == 0.25
    assert metrics["eval-rank-mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 2) / 4)


@pytest.mark.parametrize(("answers", "k", "match"), [
    (["a", "b", "c"], 3, "at most 2"),             # more than the other records
    (["a", "a", "b", "b"], 2, "needs 3 distinct"),       # too few distinct answers
    (["a", "b"], 0, "integer >= 1"),
])
def test_impossible_draws_are_refused_with_what_is_allowed(answers, k, match):
    with pytest.raises(ValueError, match=match):
        draw_distractors(answers, k, seed=0)


def test_a_model_that_prefers_one_answer_wins_only_where_it_is_true(tokenizer):
    favourite = tokenizer("roof", add_special_tokens=False)["input_ids"]
    bias = torch.zeros(1024)
    bias[favourite] = 8.0  # the stub model always prefers "roof"
    records = [{"q": "a?", "a": "roof"}, {"q": "b?", "a": "tax"},
               {"q": "c?", "a": "permit"}, {"q": "d?", "a": "bins"}]

    ranking = build_ranking_items(records, SPEC, tokenizer, 64, questions=3, k=3, seed=0,
                                  score="conditional")
    metrics = ranking_metrics(BiasModel(bias), ranking, tokenizer.pad_token_id, batch_size=5)

    assert len(ranking.items) == 3 and all(len(i.candidates) == 4 for i in ranking.items)
    # "roof" is the true answer of question 0 only; the others have it among their three
    # distractors (all other answers are drawn) and tie with the other two (every other
    # token is equally likely): ranks 1, 4, 4.
    assert metrics["eval-rank-accuracy"] == pytest.approx(1 / 3)
    assert metrics["eval-rank-mrr"] == pytest.approx((1 + 1 / 4 + 1 / 4) / 3)


def test_prompts_longer_than_max_length_are_refused(tokenizer):
    records = [{"q": "word " * 80, "a": "x"}, {"q": "word " * 80, "a": "y"}]
    with pytest.raises(ValueError, match="train.max_length=16"):
        build_ranking_items(records, SPEC, tokenizer, 16, questions=2, k=1, seed=0)


class PromptModel(torch.nn.Module):
    """Next-token logits = bias + boost on the tokens of `word` once `cue` is in the input:
    a model whose answer likelihood depends on the question."""

    def __init__(self, bias: torch.Tensor, cue: list[int], word: list[int]) -> None:
        super().__init__()
        self.bias, self.cue, self.word = torch.nn.Parameter(bias), cue, word

    def forward(self, input_ids, attention_mask=None):
        logits = self.bias.expand(*input_ids.shape, -1).clone()
        for row, ids in enumerate(input_ids.tolist()):
            if any(ids[i:i + len(self.cue)] == self.cue for i in range(len(ids))):
                logits[row, :, self.word] += 2.0
        return type("Out", (), {"logits": logits})()


def test_pmi_scores_what_the_question_adds_not_the_answers_own_likelihood(tokenizer):
    records = [{"q": "roof?", "a": "tiles"}, {"q": "tax?", "a": "permit"},
               {"q": "bins?", "a": "sorted"}]
    word = tokenizer("tiles", add_special_tokens=False)["input_ids"]
    common = tokenizer("permit", add_special_tokens=False)["input_ids"]
    bias = torch.zeros(1024)
    bias[common] = 5.0  # "permit" is likely everywhere: conditional scoring always picks it
    model = PromptModel(bias, tokenizer("roof", add_special_tokens=False)["input_ids"], word)
    pad = tokenizer.pad_token_id

    def scores(kind: str) -> dict[str, float]:
        ranking = build_ranking_items(records, SPEC, tokenizer, 64, questions=3, k=2, seed=0,
                                      score=kind)
        return ranking_metrics(model, ranking, pad, batch_size=4)

    # conditional: "permit" wins every question; right only for question 1
    assert scores("conditional")["eval-rank-accuracy"] == pytest.approx(1 / 3)
    # pmi: only question 0's cue raises its own answer; elsewhere every candidate's score is
    # its likelihood minus the same likelihood: three-way ties, which never win
    pmi = scores("pmi")
    assert pmi["eval-rank-accuracy"] == pytest.approx(1 / 3)
    assert pmi["eval-rank-mrr"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)


def test_pmi_reference_covers_the_same_answer_tokens_as_the_truncated_candidate(tokenizer):
    records = [{"q": "word " * 5, "a": "alpha beta gamma delta " * 5},
               {"q": "x", "a": "other answer"}]
    ranking = build_ranking_items(records, SPEC, tokenizer, 40, questions=1, k=1, seed=0)
    kept = sum(t != -100 for t in ranking.items[0].candidates[0]["labels"])
    bare = ranking.bare[ranking.items[0].answers[0]]
    assert kept < sum(t != -100 for t in bare["labels"])  # the bare prompt keeps more
    bias = torch.randn(1024)
    got = ranking_metrics(BiasModel(bias), ranking, tokenizer.pad_token_id, batch_size=2)
    # a question-blind model: identical tokens on both sides, so every PMI score is 0: a tie
    assert got["eval-rank-accuracy"] == 0.0


def test_an_unknown_score_is_refused(tokenizer):
    with pytest.raises(ValueError, match="eval.ranking_score='x'; allowed:"):
        build_ranking_items([{"q": "a", "a": "b"}, {"q": "c", "a": "d"}], SPEC, tokenizer, 64,
                            questions=1, k=1, seed=0, score="x")


def test_the_server_refuses_a_k_the_held_out_split_cannot_supply_before_round_0(tiny_model_dir):
    from fedapp.config import compose_config
    from fedapp.server_app import evaluation_sets

    cfg = compose_config(f"model.path={tiny_model_dir} eval.ranking_k=60")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    with pytest.raises(ValueError, match=r"eval.ranking_k=60 but the held-out split has 51 "
                                         r"records; allowed: at most 50"):
        evaluation_sets(cfg, tokenizer)
