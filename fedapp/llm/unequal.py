"""Models whose decoder layers differ in shape (a prune allocated across layers,
`fedapp.pruning.allocation`), saved and loaded without a stock config.

No transformers config holds a KV-head count or an MLP width per layer, so such a folder
keeps the unpruned model's config with each layer's shape under `LAYER_SHAPES`
(`[k_proj rows, q_proj rows, MLP channels]`, `fedapp.pruning.units.saved_config`), beside
the weights `save_model` writes (4-bit layers with their quantisation state). Its
`model_type` is `UNEQUAL_TYPE` (the family's own under `BASE_TYPE`), so plain
`from_pretrained` refuses the folder instead of loading 4-bit codes into the wrong shapes
(they are stored flat, so nothing else would stop it). `load_unequal` builds the
architecture class with its parameters on the meta device (buffers for real), puts a Linear
of each layer's own shape in place of every projection, and assigns the saved tensors: the
4-bit codes as they were saved, nothing quantised again. Attention reads its head count
from the projections' widths (`head_dim` and `num_key_value_groups` stay), so the stock
forward runs each layer at its own shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

LAYER_SHAPES = "fedapp_layer_shapes"
UNEQUAL_TYPE = "fedapp-unequal-layers"
BASE_TYPE = "fedapp_model_type"
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "mlp": ("gate_proj", "up_proj", "down_proj")}


def has_unequal_layers(config: object) -> bool:
    return getattr(config, LAYER_SHAPES, None) is not None


def mark_unequal(folder: Path) -> None:
    """Give a saved config.json of unequal layers `UNEQUAL_TYPE` as its model type."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data[BASE_TYPE], data["model_type"] = data["model_type"], UNEQUAL_TYPE
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def unequal_config(folder: Path) -> object | None:
    """The config of a folder `mark_unequal` marked, as its family's config class with
    `LAYER_SHAPES`; None for any other folder."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("model_type") != UNEQUAL_TYPE:
        return None
    if [k for k, kind in ((BASE_TYPE, str), (LAYER_SHAPES, list))
            if not isinstance(data.get(k), kind)]:
        raise ValueError(f"{path}: model_type {UNEQUAL_TYPE!r} needs {BASE_TYPE!r} (the "
                         f"family's model type) and {LAYER_SHAPES!r} (shapes per layer)")
    del data["model_type"]
    return AutoConfig.for_model(data.pop(BASE_TYPE), **data)


def _in_out(attr: str, shape: list[int], hidden: int) -> tuple[int, int]:
    k_rows, q_rows, channels = shape
    return {"q_proj": (hidden, q_rows), "k_proj": (hidden, k_rows), "v_proj": (hidden, k_rows),
            "o_proj": (q_rows, hidden), "gate_proj": (hidden, channels),
            "up_proj": (hidden, channels), "down_proj": (channels, hidden)}[attr]


def _linear4bit(state: dict[str, torch.Tensor], name: str, features: tuple[int, int],
                bias: bool, compute: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    keys = [k for k in state if k.startswith(f"{name}.weight.")]
    if f"{name}.weight" not in state or not keys:
        raise ValueError(f"{name}: no 4-bit weight with its quantisation state in the folder")
    linear = bnb.nn.Linear4bit(*features, bias=bias, compute_dtype=compute, device="meta")
    linear.weight = bnb.nn.Params4bit.from_prequantized(
        state.pop(f"{name}.weight"), {k: state.pop(k) for k in keys}, requires_grad=False,
        device="cpu", module=linear)
    return linear


def _compute_dtype(config: object) -> torch.dtype:
    quant = getattr(config, "quantization_config", None) or {}
    value = (quant if isinstance(quant, dict) else quant.to_dict()).get(
        "bnb_4bit_compute_dtype", "float32")
    return value if isinstance(value, torch.dtype) else getattr(torch, str(value))


def _swap_projections(model: nn.Module, shapes: list, state: dict[str, torch.Tensor],
                      quantised: bool, compute: torch.dtype) -> None:
    """Each layer's projections replaced by Linears of its own shape (4-bit ones holding
    their saved codes, taken out of `state`; plain ones on meta, for load_state_dict)."""
    layers = model.get_decoder().layers
    prefix = next(n for n, m in model.named_modules() if m is layers)
    if len(shapes) != len(layers):
        raise ValueError(f"{LAYER_SHAPES} has {len(shapes)} layers; the config {len(layers)}")
    for i, shape in enumerate(shapes):
        for kind, attrs in PROJECTIONS.items():
            parent = getattr(layers[i], kind)
            for attr in attrs:
                name, bias = f"{prefix}.{i}.{kind}.{attr}", getattr(parent, attr).bias
                features = _in_out(attr, shape, model.config.hidden_size)
                setattr(parent, attr, _linear4bit(state, name, features, bias is not None,
                                                  compute) if quantised else
                        nn.Linear(*features, bias=bias is not None, device="meta"))


def load_unequal(folder: Path, config: object) -> nn.Module:
    """The model a `LAYER_SHAPES` folder holds, on the CPU, fp32 outside the 4-bit layers
    (as `load_saved` loads a stock one), marked 4-bit as transformers marks its own (peft
    then wraps its layers as it does a stock 4-bit model's); ValueError naming what does
    not fit. Every tensor is read into memory, the fp32 embedding too, also where
    `nf4-embeddings` then replaces it (the stock path streams it instead)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    quantised = getattr(config, "quantization_config", None) is not None
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(file, device="cpu")
    with init_empty_weights(include_buffers=False):  # buffers (RoPE, scales) built for real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        _swap_projections(model, getattr(config, LAYER_SHAPES), state, quantised,
                          _compute_dtype(config))
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from None
    if unexpected := model.load_state_dict(state, strict=False, assign=True).unexpected_keys:
        raise ValueError(f"{folder}: weights the model does not have: {unexpected[:4]}")
    model.tie_weights()
    if meta := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise ValueError(f"{folder}: nothing in the folder for {meta[:4]}")
    model.is_loaded_in_4bit = quantised
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def load_pretrained(folder: str | Path) -> nn.Module:
    """A saved model folder, stock (`AutoModelForCausalLM.from_pretrained`, bitsandbytes
    as it configures itself) or with unequal layers (`load_unequal`), ready to generate;
    with its adapter when the folder has `adapter/` (peft): one call for any device's
    deployed model (`fedapp.server.deployed`). A 4-bit layer with fewer outputs than a
    multiple of 32 or inputs than a multiple of its block (tiny test models; real heads and
    MLP groups are 64 wide) keeps the training kernel: bitsandbytes 0.50.2's CPU inference
    repack fails on it."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = unequal_config(folder)
    model = load_unequal(folder, config) if config is not None else \
        AutoModelForCausalLM.from_pretrained(folder)
    model.config.use_cache = True
    for module in model.modules():  # bitsandbytes' CPU inference repack asserts on these
        if getattr(module, "support_avx512bf16_for_cpu", False) and (
                module.out_features % 32 or module.in_features % module.weight.blocksize):
            module.support_avx512bf16_for_cpu = False
    if (folder / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder / "adapter")
    return model.eval()
