"""FedBiOT's emulator: the base model running only some of its decoder layers.

The layers it does not run are `SkippedLayer`s (the residual stream passes through), so
module names keep the full model's layer numbers and an adapter trained on the emulator
plugs into the full model as it is.

On a device the emulator is loaded from a checkpoint that holds only its layers
(`emulator_folder`, derived once per machine from the 4-bit prepared copy by reading just
those tensors): the skipped layers' weights are never read into memory. The server, which
holds the full model anyway, runs it as an emulator in place (`emulated`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log
from torch import nn

from fedapp.llm.model import (
    cache_dir,
    disable_bnb_cpu_repack,
    prepare_elsewhere,
    prepared_dir,
    resolve_model_path,
)
from fedapp.pruning.structure import decoder_layers

LAYER_PREFIX = "model.layers."


class SkippedLayer(nn.Module):
    """A decoder layer the emulator drops: its input passes through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object
                ) -> torch.Tensor:
        return hidden_states


@contextmanager
def emulated(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` with only `layers` (decoder layer indices) for the block; the full
    layer list is put back on exit, even on errors."""
    prefix, full = decoder_layers(model)
    parent_name, _, name = prefix.rpartition(".")
    parent = model.get_submodule(parent_name)
    keep = set(layers)
    setattr(parent, name, nn.ModuleList([layer if i in keep else SkippedLayer()
                                         for i, layer in enumerate(full)]))
    try:
        yield model
    finally:
        setattr(parent, name, full)


def _source_folder(path: str, quantization: str, device: str) -> Path:
    """The checkpoint the emulator is cut from: the 4-bit prepared copy (made in a helper
    process if missing, so this one never holds the full model) or, unquantised, the model's
    own local folder."""
    source = resolve_model_path(path)
    if quantization == "nf4":
        folder = prepared_dir(source, device)
        if not (folder / "config.json").exists():
            prepare_elsewhere(source, device)
        return folder
    if not Path(source).is_dir():
        raise ValueError(f"model.path={path!r}: an unquantised emulator is cut from a local "
                         "model folder; allowed: a local folder, or model.quantization=nf4")
    return Path(source)


def _renumbered(key: str, new_index: dict[int, int]) -> str | None:
    """`key` with its decoder layer renumbered into the emulator's; None: a skipped layer."""
    if not key.startswith(LAYER_PREFIX):
        return key
    index, rest = key[len(LAYER_PREFIX):].split(".", 1)
    if int(index) not in new_index:
        return None
    return f"{LAYER_PREFIX}{new_index[int(index)]}.{rest}"


def emulator_folder(path: str, quantization: str, device: str, layers: Sequence[int]) -> Path:
    """A checkpoint of just `layers` (renumbered 0..k−1) and the non-layer weights, cut from
    the model once per machine and cached; its `emulator.json` maps them back."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = _source_folder(path, quantization, device)
    tag = hashlib.sha256(f"{source}|{list(layers)}".encode()).hexdigest()[:16]
    target = cache_dir() / "emulators" / f"{source.name}-{tag}"
    if (target / "emulator.json").exists():
        return target
    config = json.loads((source / "config.json").read_text())
    num_layers = int(config["num_hidden_layers"])
    if not layers or max(layers) >= num_layers:
        raise ValueError(f"emulator layers {list(layers)}; allowed: indices 0..{num_layers - 1}")
    new_index = {i: j for j, i in enumerate(layers)}
    config["num_hidden_layers"] = len(layers)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [config["layer_types"][i] for i in layers]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                if (new_key := _renumbered(key, new_index)) is not None:
                    tensors[new_key] = handle.get_tensor(key)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "emulator.json").write_text(json.dumps({"layers": list(layers),
                                                   "num_layers": num_layers}))
    try:
        tmp.rename(target)
    except OSError:  # another process cut it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_emulator(path: str, quantization: str, device: str,
                  layers: Sequence[int]) -> nn.Module:
    """The emulator of `layers`, frozen, its module names those of the full model."""
    from transformers import AutoModelForCausalLM

    folder = emulator_folder(path, quantization, device, layers)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=device)
    if quantization == "nf4":
        disable_bnb_cpu_repack(model)
    model.requires_grad_(False)
    model.config.use_cache = False
    num_layers = json.loads((folder / "emulator.json").read_text())["num_layers"]
    prefix, loaded = decoder_layers(model)
    full: list[nn.Module] = [SkippedLayer() for _ in range(num_layers)]
    for layer, index in zip(loaded, layers, strict=True):
        full[index] = layer
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = index
    parent_name, _, name = prefix.rpartition(".")
    setattr(model.get_submodule(parent_name), name, nn.ModuleList(full))
    model.config.num_hidden_layers = num_layers
    return model


@cache
def cached_emulator(path: str, quantization: str, device: str,
                    layers: tuple[int, ...]) -> nn.Module:
    """One emulator per process and layer set: simulation actors keep it across rounds."""
    log(INFO, "Loading the emulator of %s: %d of its layers (%s)", path, len(layers),
        ",".join(map(str, layers)))
    return load_emulator(path, quantization, device, layers)
