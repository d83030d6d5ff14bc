"""Models whose layers differ in shape (`fedapp.llm.unequal`): saved and loaded back as the
same function in every model family the app is tested with, refused by plain
transformers, and bad folders refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedapp.llm.model import disable_bnb_cpu_repack, load_base, load_saved, save_model
from fedapp.llm.unequal import LAYER_SHAPES, UNEQUAL_TYPE, load_pretrained, unequal_config
from fedapp.pruning.structure import decoder_layers
from fedapp.pruning.surgery import PrunePlan, parameter_count, prune_model
from fedapp.pruning.units import saved_config, stock_config

IDS = torch.tensor([[3, 7, 11, 40, 90, 200, 300]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def unequal_model(path, quantization: str) -> torch.nn.Module:
    """Layer 0 loses one of its 2 KV groups and 40 MLP channels; layer 1 stays whole."""
    base = load_base(str(path), quantization, "cpu")
    prune_model(base, PrunePlan(kv_groups={0: [0]}, channels={0: list(range(40))}))
    return base


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_unequal_layers_save_and_load_as_the_same_function(family_model_dir, tmp_path,
                                                           quantization):
    # Prepare
    family, path = family_model_dir
    model = unequal_model(path, quantization)
    config = saved_config(model)

    # Execute
    save_model(model, config, tmp_path / "m")
    again = load_saved(tmp_path / "m", quantization, "cpu")  # as a device's store loads it
    deployed = load_pretrained(tmp_path / "m")  # as a user loads a deployed model
    disable_bnb_cpu_repack(deployed)  # the training kernel (tiny widths; README)

    # Assert: per-layer shapes kept, the same logits, the family's class, 4-bit marked
    layers = decoder_layers(deployed)[1]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] \
        == UNEQUAL_TYPE
    assert getattr(config, LAYER_SHAPES) == [list(s) for s in (
        (16, 32, 88), (32, 64, 128))]  # [k rows, q rows, channels]: head_dim 16
    assert [layer.mlp.down_proj.in_features for layer in layers] == [88, 128]
    assert type(deployed).__name__ == type(model).__name__, family
    assert parameter_count(deployed) == parameter_count(again) == parameter_count(model)
    assert deployed.is_loaded_in_4bit == (quantization == "nf4")
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    torch.testing.assert_close(logits(deployed), logits(model), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=f"model type `{UNEQUAL_TYPE}`"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_layers_made_equal_again_save_a_stock_config(tiny_model_dir, tmp_path):
    model = unequal_model(tiny_model_dir, "none")
    save_model(model, saved_config(model), tmp_path / "m")
    again = load_saved(tmp_path / "m", "none", "cpu")
    prune_model(again, PrunePlan(kv_groups={1: [0]}, channels={1: list(range(40))}))

    config = stock_config(again)

    assert not hasattr(config, LAYER_SHAPES)
    assert (config.num_key_value_heads, config.intermediate_size) == (1, 88)


def test_a_bad_unequal_folder_is_refused_by_name(tiny_model_dir, tmp_path):
    model = unequal_model(tiny_model_dir, "none")
    save_model(model, saved_config(model), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    assert unequal_config(tiny_model_dir) is None  # a stock folder

    path.write_text(json.dumps({k: v for k, v in data.items() if k != LAYER_SHAPES}))
    with pytest.raises(ValueError, match="needs 'fedapp_model_type' .* and "
                                         "'fedapp_layer_shapes'"):
        load_pretrained(tmp_path / "m")
    path.write_text(json.dumps(data | {LAYER_SHAPES: data[LAYER_SHAPES][:1]}))
    with pytest.raises(ValueError, match="fedapp_layer_shapes has 1 layers; the config 2"):
        load_pretrained(tmp_path / "m")
