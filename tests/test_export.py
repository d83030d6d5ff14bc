"""The exported global adapter is what the server evaluated: plain peft loads it."""

from __future__ import annotations

from flwr.app import ArrayRecord
from peft import PeftModel

from fedapp.config import build_strategy, compose_config, data_spec
from fedapp.llm.adapters import target_module_shapes
from fedapp.llm.model import load_base, load_tokenizer
from fedapp.llm.train import eval_loss
from fedapp.server.evaluate import (
    evaluate_adapter,
    export_adapter,
    heldout_examples,
)
from strategies import FLoRA
from strategies.lora_math import LoraUpdate, split_factors
from tests.test_client import random_adapter


def test_flora_global_adapter_exports_and_reloads_with_the_same_loss(tiny_model_dir, tmp_path):
    cfg = compose_config(f"model.path={tiny_model_dir} lora.target_modules=[q_proj,v_proj] "
                         "train.max_length=64 strategy=flora strategy.ranks=[2,3] "
                         "strategy.rank_budget=4 lora.alpha_ratio=2.0")
    base = load_base(str(tiny_model_dir), "nf4", "cpu")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = heldout_examples(data_spec(cfg), tokenizer, 64, max_examples=16)
    strategy = build_strategy(cfg, target_module_shapes(base, ["q_proj", "v_proj"]))
    updates = [LoraUpdate(split_factors(random_adapter(base, r, seed=r)), scaling=2.0,
                          weight=float(r)) for r in (2, 3)]
    arrays, figures = strategy.aggregate_updates(1, updates)
    state, r, alpha = strategy.global_adapter(ArrayRecord(arrays.to_torch_state_dict()))

    reported = evaluate_adapter(base, state, r, alpha, examples, 8, tokenizer.pad_token_id)
    export_adapter(base, state, r, alpha, tmp_path / "adapter", str(tiny_model_dir))
    fresh = load_base(str(tiny_model_dir), "nf4", "cpu")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    loss = eval_loss(reloaded, examples, 8, tokenizer.pad_token_id)
    base_loss = eval_loss(load_base(str(tiny_model_dir), "nf4", "cpu"), examples, 8,
                          tokenizer.pad_token_id)

    assert isinstance(strategy, FLoRA) and strategy.ranks == [2, 3]
    assert (r, alpha) == (4, 4.0) and figures["svd-dropped-error"] > 0  # 2+3 > budget 4
    assert abs(loss - reported["eval-loss"]) <= 1e-4 * reported["eval-loss"]
    assert abs(loss - base_loss) > 1e-4  # the adapter is really applied


def test_target_module_shapes_name_peft_keys(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "nf4", "cpu")

    shapes = target_module_shapes(base, ["q_proj", "k_proj"])

    assert shapes["base_model.model.model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["base_model.model.model.layers.1.self_attn.k_proj"] == (32, 64)  # 2 KV heads
    assert len(shapes) == 4
