"""Greedy answers and ROUGE-L: the decode against a hand-rolled argmax loop, the score against
hand-counted longest common subsequences, and the file a person reads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedapp.server.generate import greedy_answers, rouge_l, write_generations


def test_rouge_l_is_the_lcs_f1_over_words_of_any_script():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat: 4 of 6 each way
    assert rouge_l(["the cat lay on a mat"], ["the cat sat on the mat"]) == [
        pytest.approx(4 / 6)]
    # accented words stay whole: 2 of 3 words in common, both ways
    assert rouge_l(["Licencia de construcción"], ["licencia de obra"]) == [
        pytest.approx(2 / 3)]
    assert rouge_l(["x"], ["y"]) == [0.0]


def test_greedy_answers_follow_the_argmax_of_each_next_token(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = "### Instruction:\nWhat permit do I need?\n\n### Response:\n"

    got = greedy_answers(model, tokenizer, [prompt], max_new_tokens=6)

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole sequence every step
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert got == [tokenizer.decode(new, skip_special_tokens=True).strip()]


def test_the_generations_file_holds_every_answer_beside_its_reference(tmp_path):
    out = tmp_path / "generations.json"

    means = write_generations(out, ["p1", "p2"], ["a b c", "d e"],
                              {"base": ["x", "d e"], "final": ["a b c", "d"]})

    saved = json.loads(out.read_text())
    assert means == {"rouge-l-base": pytest.approx(0.5),
                     "rouge-l-final": pytest.approx((1 + 2 / 3) / 2)}
    assert saved["examples"][1] == {"prompt": "p2", "reference": "d e", "answer-base": "d e",
                                    "answer-final": "d", "rouge-l-base": 1.0,
                                    "rouge-l-final": 0.6667}
