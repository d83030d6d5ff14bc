"""Every model family the app is tested with (tiny models built from config: Llama, Gemma-3,
Qwen2): the special tokens each expects, a 4-bit client round, evaluation, FedSpine's
pruning and the exported adapter; a family the pruning does not know is refused first."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

from fedapp.client.partition import partition_examples
from fedapp.client.round import run_round
from fedapp.config import compose_config, data_spec, run_setup
from fedapp.llm.data import DataSpec, encode_prompt, prompt_and_response, prompt_text
from fedapp.llm.loss import lm_loss
from fedapp.llm.model import cached_base, load_base, load_tokenizer
from fedapp.pruning.structure import check_prunable
from fedapp.server.evaluate import evaluate_adapter, export_adapter, heldout_examples
from strategies.protocol import PruneOrder, TrainOrder


@pytest.fixture
def family_setup(family_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAPP_CACHE", str(tmp_path / "cache"))
    partition_examples.cache_clear()
    family, path = family_model_dir
    cfg = compose_config(f"model.path={path} train.max_length=64 partitioner=iid")
    return family, path, cfg


def test_prompts_start_as_each_family_expects(family_model_dir):
    family, path = family_model_dir
    tokenizer = load_tokenizer(str(path))
    prompt = prompt_text({"q": "What permit do I need?"}, DataSpec(), tokenizer)

    ids = encode_prompt(prompt, tokenizer)
    example = prompt_and_response(prompt, "A building permit.", tokenizer, 64)

    bos = tokenizer.bos_token_id
    if family == "gemma3":  # Gemma's encoding starts with <bos>; no template wrote it
        assert ids[0] == bos and ids.count(bos) == 1
    else:  # SmolLM2-like Llama and Qwen2 have no BOS in their format
        assert bos is None or bos not in ids
    if family == "qwen2":  # its chat template's turn markers are single special tokens
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert example["input_ids"][:len(ids)] == ids  # training, eval and scoring: same prefix


def test_a_template_that_writes_bos_itself_gets_it_once(tmp_path):
    from tests.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "gemma", family="gemma3")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n"
                               "{% endfor %}")

    ids = encode_prompt(prompt_text({"q": "Why?"}, DataSpec(), tokenizer), tokenizer)

    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_a_4bit_round_trains_evaluates_and_exports(family_setup, tmp_path):
    _, path, cfg = family_setup
    setup = run_setup(cfg)
    order = TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=3, seed=0)

    result = run_round(setup, order, 0, 2, {}, device="cpu")

    assert result.metrics["num-examples"] > 0 and math.isfinite(result.metrics["train-loss"])
    assert {v.shape[0] for k, v in result.state.items() if "lora_A" in k} == {4}
    base = cached_base(str(path), "nf4", "cpu")
    tokenizer = load_tokenizer(str(path))
    examples = heldout_examples(data_spec(cfg), tokenizer, 64, 8)
    state = {k: v.float() for k, v in result.state.items()}
    before = evaluate_adapter(base, {}, 4, 8.0, examples, 4, tokenizer.pad_token_id)
    after = evaluate_adapter(base, state, 4, 8.0, examples, 4, tokenizer.pad_token_id)
    assert after["eval-loss"] != before["eval-loss"]
    export_adapter(base, state, 4, 8.0, tmp_path / "adapter", str(path))
    loaded = PeftModel.from_pretrained(load_base(str(path), "nf4", "cpu"), tmp_path / "adapter")
    batch = {k: torch.tensor([v]) for k, v in examples[0].items()}
    with torch.no_grad():  # the chunked loss (the family's tied head) = its own loss
        assert float(lm_loss(loaded, batch)) == pytest.approx(
            float(lm_loss(loaded, batch, loss="plain")), rel=1e-4)


def test_fedspine_pruning_shrinks_each_family(family_setup):
    family, _, cfg = family_setup
    order = TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=2, seed=0,
                       prune=PruneOrder(ratio=0.5, criterion="taylor", slices=2, tune_steps=1))

    result = run_round(run_setup(cfg), order, 1, 2, {}, device="cpu")

    assert result.kept, family  # sliced Linears report the rows / columns they kept
    assert result.metrics["params-ratio"] < 0.9
    assert math.isfinite(result.metrics["loss-after"])


def test_a_family_the_pruning_does_not_know_is_refused_by_name():
    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16)
    with pytest.raises(ValueError, match=r"does not support OPTForCausalLM \(model_type "
                                         r"'opt'\): layer 0 lacks \['self_attn.o_proj'"):
        check_prunable(OPTForCausalLM(config))


def test_the_server_refuses_a_pruning_run_on_an_unknown_family_before_round_0(tiny_model_dir,
                                                                              tmp_path):
    from fedapp.server_app import run

    path = tmp_path / "tiny-opt"
    config = OPTConfig(vocab_size=1024, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16)
    OPTForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    cfg = compose_config(f"strategy=fedspine scenario=phones_laptops_edge model.path={path} "
                         "lora.target_modules=[q_proj,v_proj]")

    class NoGrid:  # the run must stop before it asks for a single client
        def __getattr__(self, name):
            raise AssertionError(f"grid.{name} used before the model was checked")

    with pytest.raises(ValueError, match="does not support OPTForCausalLM"):
        run(NoGrid(), cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
