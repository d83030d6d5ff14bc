"""FedBiOT's emulator: the base model running only some of its decoder layers.

The layers it does not run are `SkippedLayer`s (the residual stream passes through), so
module names keep the full model's layer numbers and an adapter trained on the emulator
plugs into the full model as it is.

On a device the emulator is loaded from a checkpoint that holds only its layers
(`emulator_folder`: cut once per machine from the model's own checkpoint, reading just
those tensors, in a helper process; then quantised to 4-bit like any base): the skipped
layers' weights are never read into memory, and the full model is never loaded. The server, which
holds the full model anyway, runs it as an emulator in place (`emulated`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log
from torch import nn

from fedapp.llm.model import cache_dir, load_base, resolve_model_path
from fedapp.pruning.structure import decoder_layers


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


_LAYER_KEY = re.compile(r"^(.*?layers\.)(\d+)\.(.*)$")


def _source_folder(path: str) -> Path:
    """The model's own checkpoint folder (a Hub id: its config and safetensors downloaded,
    which needs a network)."""
    source = resolve_model_path(path)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's, else model*.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no model*.safetensors: FedBiOT's emulator is cut from "
                         "a safetensors checkpoint (pytorch_model.bin is not read); allowed: "
                         "a model saved with safetensors")
    return files


def _fingerprint(files: Sequence[Path]) -> str:
    return "".join(f"|{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def emulator_folder(path: str, layers: Sequence[int]) -> Path:
    """A checkpoint of just `layers` (renumbered 0..k−1) and the weights outside the decoder
    layers, cut at the model's own precision from its checkpoint, reading only those tensors;
    cached per model and layer set. Its `emulator.json` maps the layers back."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    source = _source_folder(path)
    files = _weight_files(source)
    tag = hashlib.sha256(f"{source}|{list(layers)}{_fingerprint(files)}".encode()).hexdigest()
    target = cache_dir() / "emulators" / f"{source.name}-{tag[:16]}"
    if (target / "emulator.json").exists():
        return target
    config = AutoConfig.from_pretrained(source)
    if not hasattr(config, "num_hidden_layers"):
        raise ValueError(f"model.path={path!r}: {type(config).__name__} has no "
                         "num_hidden_layers; allowed: a decoder-only language model")
    num_layers = int(config.num_hidden_layers)
    if not layers or min(layers) < 0 or max(layers) >= num_layers:
        raise ValueError(f"emulator layers {list(layers)}; allowed: indices 0..{num_layers - 1}")
    new_index = {i: j for j, i in enumerate(layers)}
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                found = _LAYER_KEY.match(key)
                if found is None:
                    tensors[key] = handle.get_tensor(key)
                elif int(found.group(2)) in new_index:
                    new_key = f"{found.group(1)}{new_index[int(found.group(2))]}.{found.group(3)}"
                    tensors[new_key] = handle.get_tensor(key)
    seen = {int(m.group(2)) for k in tensors if (m := _LAYER_KEY.match(k))}
    if seen != set(range(len(layers))):
        raise ValueError(f"model.path={path!r}: the checkpoint lacks weights of layers "
                         f"{sorted(set(layers) - {layers[j] for j in seen})}")
    full_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(layers)
    if isinstance(full_types, list):
        config.layer_types = [full_types[i] for i in layers]
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    config.save_pretrained(tmp)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "emulator.json").write_text(json.dumps({
        "layers": list(layers), "num_layers": num_layers,
        "layer_types": full_types if isinstance(full_types, list) else None}))
    try:
        tmp.rename(target)
    except OSError:  # another process cut it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cut_elsewhere(path: str, layers: Sequence[int]) -> Path:
    """`emulator_folder` in a short-lived helper process: the tensors it reads at the
    model's precision never enter this one."""
    from fedapp.llm.helper import run_helper

    run_helper("fedapp.llm.emulator", [path, ",".join(map(str, layers))],
               f"cutting the emulator of layers {list(layers)} from {path}")
    return emulator_folder(path, layers)  # cut now: only finds it


def load_emulator(path: str, quantization: str, device: str,
                  layers: Sequence[int]) -> nn.Module:
    """The emulator of `layers`, frozen, its module names those of the full model: its
    checkpoint cut in a helper process, then loaded as any base is (`load_base`: quantised
    to 4-bit once per machine, in a helper for a large one) — no process here ever reads
    the layers it skips."""
    folder = cut_elsewhere(path, layers)
    model = load_base(str(folder), quantization, device)
    meta = json.loads((folder / "emulator.json").read_text())
    prefix, loaded = decoder_layers(model)
    full: list[nn.Module] = [SkippedLayer() for _ in range(meta["num_layers"])]
    for layer, index in zip(loaded, layers, strict=True):
        full[index] = layer
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = index
    parent_name, _, name = prefix.rpartition(".")
    setattr(model.get_submodule(parent_name), name, nn.ModuleList(full))
    model.config.num_hidden_layers = meta["num_layers"]
    if meta["layer_types"] is not None:  # per-layer attention kinds, by full-model index
        model.config.layer_types = meta["layer_types"]
    return model


@cache
def cached_emulator(path: str, quantization: str, device: str,
                    layers: tuple[int, ...]) -> nn.Module:
    """One emulator per process and layer set: simulation actors keep it across rounds."""
    log(INFO, "Loading the emulator of %s: %d of its layers (%s)", path, len(layers),
        ",".join(map(str, layers)))
    return load_emulator(path, quantization, device, layers)


if __name__ == "__main__":  # cut_elsewhere's helper: cut the emulator's checkpoint
    import sys

    emulator_folder(sys.argv[1], tuple(int(i) for i in sys.argv[2].split(",")))
