"""A device's pruned bases on its own disk, so that it never loads the unpruned base again.

After a round that leaves a device with a pruned copy of the base, the client writes that
copy (LoRA removed) to `$FEDAPP_CACHE/pruned/<model>-<quantization>-<dtype>-<digest>/`,
keyed by the model, its quantisation, the compute dtype and the structure reached
(`fedapp.pruning.units`). A later round at that structure with no copy in its process (a
deployed SuperNode starts a process per message; a simulation actor that served other
partitions) loads it directly: its 4-bit codes as they were (nothing is quantised again),
so the process never holds the unpruned model beside or before its pruned one. Only the
round that first prunes a device scores the unpruned model.

A folder is a stock transformers model (`save_model`; every layer keeps the same shapes,
`stock_config`) plus `pruned.json`: how it was cut from the full base (kept rows/columns
per module, dropped blocks, parameter counts), the full base's LoRA targets and block
costs. With `nf4-embeddings` the held embedding is the 4-bit stand-in, so the folder takes
the fp32 embedding byte for byte from the files the base was loaded from, streamed, and the
load quantises it again exactly as the first load did. Structures a stock config cannot
hold (unequal layers, dropped blocks) are not stored: those rounds rebuild by slicing.

`FEDAPP_PRUNED_STORE` = how many structures are kept (default 8, least recently used go
first; SmolLM2-135M: ≈0.14 GB each), 0 = off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from logging import DEBUG, INFO, WARNING
from pathlib import Path

import torch
from flwr.common.logger import log
from safetensors.torch import save_file

from fedapp.client.pruned import PrunedCopy, units_key
from fedapp.llm.embedding import Nf4Embedding, Nf4Head
from fedapp.llm.model import (
    cache_dir,
    compute_dtype,
    load_saved,
    prepared_dir,
    resolve_model_path,
)
from fedapp.pruning.surgery import KeptIndices, PruneResult
from fedapp.pruning.units import stock_config

META = "pruned.json"
COPY_CHUNK = 16 * 2**20  # bytes per read while streaming a tensor between files


def store_size() -> int:
    value = os.environ.get("FEDAPP_PRUNED_STORE", "8")
    if not value.isdigit():
        raise ValueError(f"FEDAPP_PRUNED_STORE={value!r}; allowed: an integer >= 0 (0: off)")
    return int(value)


def store_dir(model_path: str, quantization: str, device: str,
              units: Mapping[str, torch.Tensor]) -> Path:
    """The folder of the base `model_path` pruned to `units`, in `quantization` on `device`."""
    source = resolve_model_path(model_path)
    ident = prepared_dir(source, device).name  # the source's identity (a changed model differs)
    digest = hashlib.sha256(repr((ident, quantization, units_key(units))).encode())
    dtype = str(compute_dtype(device)).removeprefix("torch.")
    return cache_dir() / "pruned" / (f"{Path(source).name or 'model'}-{quantization}-{dtype}-"
                                     f"{digest.hexdigest()[:16]}")


def save_model(model: torch.nn.Module, config: object, out_dir: Path,
               state: Mapping[str, torch.Tensor] | None = None,
               file: str = "model.safetensors") -> None:
    """The model's weights (4-bit ones with their quantisation state, tied ones once), or
    `state` in their place, and `config`, as a folder `from_pretrained` loads.
    transformers 5 cannot re-save a model it loaded pre-quantised (no reverse weight
    conversion), so the state dict is written here."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tied = getattr(config, "tie_word_embeddings", False)
    state = model.state_dict() if state is None else state
    save_file({k: v.detach().contiguous() for k, v in state.items()
               if not (tied and k == "lm_head.weight")}, out_dir / file,
              metadata={"format": "pt"})
    config.use_cache = True
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def _header(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return 8 + size, json.loads(handle.read(size))


def copy_tensors(folder: Path, names: Iterable[str], target: Path) -> list[str]:
    """Write the tensors `names` found in `folder`'s safetensors files to the safetensors
    file `target`, byte for byte and streamed (never whole in memory); the names found."""
    found: dict[str, tuple[Path, int, int, dict]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        start, header = _header(file)
        for name in names:
            if name in header and name not in found:
                begin, end = header[name]["data_offsets"]
                found[name] = (file, start + begin, end - begin, header[name])
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (_, _, length, info) in found.items():
        header[name] = {"dtype": info["dtype"], "shape": info["shape"],
                        "data_offsets": [offset, offset + length]}
        offset += length
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format allows trailing spaces; keeps data aligned
    with open(target, "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for file, begin, length, _ in found.values():
            with open(file, "rb") as source:
                source.seek(begin)
                while length:
                    chunk = source.read(min(length, COPY_CHUNK))
                    out.write(chunk)
                    length -= len(chunk)
    return list(found)


def _write(copy: PrunedCopy, folder: Path, weights: Path | None) -> bool:
    """Write `copy` into the new folder `folder`; False when it cannot be stored."""
    from transformers import AutoConfig

    base = copy.base
    config = stock_config(base)  # ValueError for a structure a stock config cannot hold
    small = [name for name, m in base.named_modules() if isinstance(m, Nf4Embedding | Nf4Head)]
    if not small:
        save_model(base, config, folder)
    else:  # nf4-embeddings: the fp32 tables from the folder the base was loaded from
        if weights is None:
            return False
        config.tie_word_embeddings = AutoConfig.from_pretrained(weights).tie_word_embeddings
        state = {k: v for k, v in base.state_dict().items()
                 if not any(k.startswith(name + ".") for name in small)}
        files = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
        save_model(base, config, folder, state, files[0])
        tables = copy_tensors(weights, [f"{name}.weight" for name in small], folder / files[1])
        if not tables:
            return False
        weight_map = {k: files[0] for k in state if not (
            config.tie_word_embeddings and k == "lm_head.weight")} | dict.fromkeys(tables,
                                                                             files[1])
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}))
    result = copy.result
    (folder / META).write_text(json.dumps({
        "kept": {k: [v.out_idx.tolist(), v.in_idx.tolist()] for k, v in result.kept.items()},
        "dropped": result.dropped, "params_before": result.params_before,
        "params_after": result.params_after, "targets": copy.targets,
        "full_costs": [[layer, kind, cost] for (layer, kind), cost in
                       copy.full_costs.items()]}))
    return True


def store_copy(copy: PrunedCopy, folder: Path, weights: Path | None) -> bool:
    """Keep `copy` (its LoRA removed) at `folder` unless it is there already or the store
    is off; `weights`: the folder the full base was loaded from (nf4-embeddings reads its
    fp32 embedding there). Whether the folder holds the copy now. Trims the store."""
    if (folder / META).exists():
        return True
    if store_size() == 0:
        return False
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        stored = _write(copy, tmp, weights)
    except ValueError as err:  # not a stock shape: this structure is rebuilt by slicing
        log(DEBUG, "Pruned copy not stored: %s", err)
        stored = False
    except OSError as err:  # a full or read-only disk costs later rounds time, not this one
        log(WARNING, "Pruned copy not stored at %s: %s", folder, err)
        stored = False
    if stored:
        try:
            tmp.rename(folder)
        except OSError:  # another process stored it first
            stored = (folder / META).exists()
    shutil.rmtree(tmp, ignore_errors=True)
    trim(folder.parent, store_size())
    return stored


def trim(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used stored copies under `root`."""
    if not root.is_dir():
        return
    folders = sorted((p for p in root.iterdir() if (p / META).exists()),
                     key=lambda p: (p / META).stat().st_mtime_ns, reverse=True)
    for old in folders[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def load_copy(folder: Path, quantization: str, device: str) -> PrunedCopy | None:
    """The stored copy at `folder`, loaded (None when there is none, or when it cannot be
    read: removed meanwhile, damaged; the round then slices the base as without a store)."""
    if not (folder / META).exists():
        return None
    try:
        meta = json.loads((folder / META).read_text())
        result = PruneResult({k: KeptIndices(torch.tensor(o, dtype=torch.long),
                                             torch.tensor(i, dtype=torch.long))
                              for k, (o, i) in meta["kept"].items()}, meta["dropped"],
                             meta["params_before"], meta["params_after"])
        costs = {(layer, kind): cost for layer, kind, cost in meta["full_costs"]}
        base = load_saved(folder, quantization, device)
        (folder / META).touch()  # most recently used
    except Exception as err:  # noqa: BLE001  a cache: whatever is wrong with it (a file
        # cut short, removed meanwhile, bad JSON, safetensors' own errors) costs time only
        log(WARNING, "Stored pruned copy %s unreadable (%s); slicing the base instead",
            folder, err)
        return None
    log(INFO, "Loaded the pruned base from %s", folder)
    return PrunedCopy(base, result, meta["targets"], costs)
