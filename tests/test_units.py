"""A pruned device's structure: reported as kept units, rebuilt from them by slicing alone,
checked by the server, and exported as a stock model that loads in one call."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from fedapp.llm.adapters import PEFT_PREFIX, with_lora
from fedapp.llm.model import disable_bnb_cpu_repack, load_base, load_tokenizer
from fedapp.llm.unequal import load_pretrained
from fedapp.pruning.importance import score
from fedapp.pruning.structure import dense_weight
from fedapp.pruning.surgery import (
    PrunePlan,
    iterative_prune,
    parameter_count,
    plan_pruning,
    prune_model,
)
from fedapp.pruning.units import apply_units, stock_config, units_of
from fedapp.server.deployed import export_device
from strategies.lora_math import LORA_A, LORA_B
from strategies.replies import RejectedReply
from strategies.units import read_units

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: dense_weight(m) for n, m in model.named_modules() if n.endswith(LINEARS)}


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_structure_rebuilt_by_slicing_is_the_pruned_model(wide_dir, quantization):
    # Prepare: prune in two Taylor-free slices (magnitude), as a device does over rounds
    pruned = load_base(wide_dir, quantization, "cpu")
    first = iterative_prune(pruned, 0.5, 2, lambda m: None, "magnitude")

    # Execute
    units = units_of(pruned, first)
    rebuilt = load_base(wide_dir, quantization, "cpu")
    result = apply_units(rebuilt, units)

    # Assert: the same kept rows / columns and bit-identical weights (4-bit MLP groups are
    # whole quantisation blocks and KV heads whole rows, so slicing keeps the codes)
    assert set(units) == {"0.self_attn", "0.mlp", "1.self_attn", "1.mlp"}
    assert all(len(units[f"{i}.mlp"]) % (64 if quantization == "nf4" else 1) == 0
               for i in range(2))
    assert result.kept.keys() == first.kept.keys()
    for name, kept in first.kept.items():
        assert torch.equal(result.kept[name].out_idx, kept.out_idx), name
        assert torch.equal(result.kept[name].in_idx, kept.in_idx), name
    got, expected = weights(rebuilt), weights(pruned)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert parameter_count(rebuilt) == parameter_count(pruned) < parameter_count(
        load_base(wide_dir, quantization, "cpu"))


def test_bad_structures_are_refused_by_name(wide_dir):
    base = load_base(wide_dir, "none", "cpu")
    with pytest.raises(ValueError, match="names '7.mlp'; allowed: '<layer>.self_attn' or "
                                         "'<layer>.mlp' of layers 0..1"):
        apply_units(base, {"7.mlp": torch.tensor([0])})
    with pytest.raises(ValueError, match="0.self_attn: kept indices must be sorted, unique "
                                         "and in 0..1"):
        apply_units(base, {"0.self_attn": torch.tensor([2])})
    nf4 = load_base(wide_dir, "nf4", "cpu")
    with pytest.raises(ValueError, match="whole groups of 64"):
        apply_units(nf4, {"0.mlp": torch.arange(1, 65)})


def test_stock_config_needs_one_shape_for_every_layer(wide_dir):
    base = load_base(wide_dir, "none", "cpu")
    apply_units(base, {"0.self_attn": torch.tensor([1]), "1.self_attn": torch.tensor([0]),
                       "0.mlp": torch.arange(100), "1.mlp": torch.arange(200, 300)})
    config = stock_config(base)
    assert (config.num_key_value_heads, config.num_attention_heads, config.head_dim,
            config.intermediate_size) == (1, 2, 16, 100)
    assert base.config.intermediate_size == 512  # the model's own config is left alone

    unequal = load_base(wide_dir, "none", "cpu")
    prune_model(unequal, PrunePlan(channels={0: [0, 1]}))
    with pytest.raises(ValueError, match="unequal shapes"):
        stock_config(unequal)
    dropped = load_base(wide_dir, "none", "cpu")
    prune_model(dropped, PrunePlan(blocks=[(1, "mlp")]))
    with pytest.raises(ValueError, match=r"blocks \['1.mlp'\] were dropped whole"):
        stock_config(dropped)


def units_reply(**arrays: torch.Tensor) -> RecordDict:
    return RecordDict({"units": ArrayRecord(arrays)})


def test_the_server_accepts_only_further_pruning():
    before = {"0.mlp": [0, 1, 2, 5], "0.self_attn": [1]}

    ok = read_units(units_reply(**{"0.mlp": torch.tensor([1, 5]), "0.self_attn": torch.tensor(
        [1]), "1.mlp": torch.tensor([3, 4])}), before)

    assert ok == {"0.mlp": [1, 5], "0.self_attn": [1], "1.mlp": [3, 4]}
    assert read_units(RecordDict({}), {}) == {}
    bad = [
        (units_reply(**{"0.mlp": torch.tensor([1, 3])}, **{"0.self_attn": torch.tensor([1])}),
         "0.mlp keeps units the device had pruned before"),
        (units_reply(**{"0.mlp": torch.tensor([1])}), r"un-prunes \['0.self_attn'\]"),
        (units_reply(**{"0.mlp": torch.tensor([2, 1])}, **{"0.self_attn": torch.tensor([1])}),
         "sorted, unique and non-negative"),
        (units_reply(**{"0.attn": torch.tensor([1])}), "holds '0.attn'"),
        (units_reply(**{"0.mlp": torch.tensor([1.0])}, **{"0.self_attn": torch.tensor([1])}),
         r"'0.mlp' has dtype 'float32'; allowed: \['int32', 'int64'\]"),
        (RecordDict({}), "lacks its 'units' record"),
    ]
    for content, reason in bad:
        with pytest.raises(RejectedReply, match=reason):
            read_units(content, before)


def global_adapter(full: torch.nn.Module, targets: tuple[str, ...], r: int, seed: int
                   ) -> dict[str, torch.Tensor]:
    """A random G of rank r on `targets` of the full model, as the server holds it."""
    gen = torch.Generator().manual_seed(seed)
    g = {}
    for name, m in full.named_modules():
        if name.endswith(targets):
            g[PEFT_PREFIX + name + LORA_A] = 0.3 * torch.randn(r, m.in_features, generator=gen)
            g[PEFT_PREFIX + name + LORA_B] = 0.3 * torch.randn(m.out_features, r, generator=gen)
    return g


def recording(targets: tuple[str, ...], seen: dict):
    """An `evaluate` for export_device that keeps the logits of what it evaluated."""
    def evaluate(model, cut, r, alpha):
        with with_lora(model, r, alpha, list(targets), 0, init_state=cut) as m:
            seen["logits"] = m(torch.tensor([[1, 5, 9, 300]])).logits.detach()
        return {"eval-loss": 1.0}
    return evaluate


def test_an_exported_device_loads_in_one_call_as_what_was_evaluated(wide_dir, tmp_path,
                                                                    tiny_model_dir):
    # Prepare: a structure and a global adapter G on q / v of the full model
    base = load_base(wide_dir, "nf4", "cpu")
    units = units_of(base, prune_model(base, plan_pruning(score(base, "magnitude"), 0.5)))
    full = load_base(wide_dir, "nf4", "cpu")
    g, seen = global_adapter(full, ("q_proj", "v_proj"), 6, seed=3), {}
    evaluate = recording(("q_proj", "v_proj"), seen)

    # Execute
    figures = export_device(wide_dir, "nf4", {k: v.tolist() for k, v in units.items()},
                            (g, 6, 6.0), tmp_path / "phone", load_tokenizer(str(tiny_model_dir)),
                            evaluate)
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "phone" / "adapter")
    disable_bnb_cpu_repack(loaded)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "phone")

    # Assert: the stock class at the pruned shapes, 4-bit, its adapter attached, and the
    # same function as the model the server evaluated
    assert isinstance(loaded, PeftModel) and type(plain).__name__ == "LlamaForCausalLM"
    layer = loaded.get_base_model().model.layers[0]
    assert type(layer.mlp.up_proj).__name__ == "Linear4bit"
    assert layer.mlp.up_proj.out_features == len(units["0.mlp"]) < 512
    lora = sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n)
    assert parameter_count(loaded) - lora == figures["params"] < parameter_count(full)
    assert figures["params-ratio"] < 0.8 and figures["eval-loss"] == 1.0
    with torch.no_grad():
        got = loaded(torch.tensor([[1, 5, 9, 300]])).logits
    torch.testing.assert_close(got, seen["logits"])


def test_an_exported_device_with_unequal_layers_loads_with_one_call(wide_dir, tmp_path,
                                                                    tiny_model_dir):
    # Prepare: layer 0 pruned, layer 1 whole (what a global allocation can leave), and G
    units = {"0.self_attn": [1], "0.mlp": list(range(64, 192))}
    full = load_base(wide_dir, "nf4", "cpu")
    g, seen = global_adapter(full, ("q_proj", "down_proj"), 4, seed=4), {}
    evaluate = recording(("q_proj", "down_proj"), seen)

    # Execute
    figures = export_device(wide_dir, "nf4", units, (g, 4, 4.0), tmp_path / "phone",
                            load_tokenizer(str(tiny_model_dir)), evaluate)
    loaded = load_pretrained(tmp_path / "phone")
    disable_bnb_cpu_repack(loaded)  # the kernel the server evaluated with (as above)

    # Assert: each layer at its own shape, 4-bit, the adapter attached, the function the
    # server evaluated; plain transformers refuses the folder rather than load it wrong
    assert isinstance(loaded, PeftModel)
    layers = loaded.get_base_model().model.layers
    assert [layer.mlp.down_proj.in_features for layer in layers] == [128, 512]
    assert [layer.self_attn.q_proj.out_features for layer in layers] == [32, 64]
    assert type(layers[0].mlp.up_proj).__name__ == "Linear4bit"
    lora = sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n)
    assert parameter_count(loaded) - lora == figures["params"] < parameter_count(full)
    with torch.no_grad():
        got = loaded(torch.tensor([[1, 5, 9, 300]])).logits
    torch.testing.assert_close(got, seen["logits"])
    with pytest.raises(ValueError, match="model type `fedapp-unequal-layers`"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "phone")
