"""A device's pruned bases on its own disk, so that it need not load the unpruned base again.

After a round that leaves a device with a pruned copy of the base, the client writes that
copy (LoRA removed) to `$FEDAPP_CACHE/pruned/<model>-<quantization>-<dtype>-<digest>/`,
keyed by the model, its quantisation, the compute dtype and the structure reached
(`fedapp.pruning.units`). A later round at that structure with no copy in its process (a
deployed SuperNode starts a process per message; a simulation actor that served other
partitions) loads it directly: its 4-bit codes as they were (nothing is quantised again),
so that process never holds the unpruned model. Rounds that still do: a device's first
pruning round (it scores the unpruned model), and any round whose structure is not stored
(the store off or full, a structure with dropped blocks; `nf4-embeddings` on a Hub model
without a local copy).

A folder is a transformers model (`save_model`, `saved_config`: a stock config, or per-layer
shapes `load_saved` reads when a global prune left layers unequal) plus `pruned.json`:
how it was cut from the full base (kept rows / columns per module, dropped blocks,
parameter counts, each MLP's channel group size, decided on the unpruned block) and the
full base's block costs; the round's LoRA targets are taken from
the loaded model, not stored. With `nf4-embeddings` the held embedding is the 4-bit
stand-in, so the folder takes the fp32 embedding byte for byte from the files the base was
loaded from, streamed, and the load quantises it again exactly as the first load did.

`FEDAPP_PRUNED_STORE` = how many structures are kept per machine (default 8, least recently
used go first; SmolLM2-135M: ≈0.14 GB each), 0 = off (nothing written or read). A store that
cannot be written or read costs time, never the round: the round slices the base instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from logging import DEBUG, INFO, WARNING
from pathlib import Path

import torch
from flwr.common.logger import log

from fedapp.client.pruned import PrunedCopy, count_setting, target_keys, units_key
from fedapp.llm.embedding import Nf4Embedding, Nf4Head
from fedapp.llm.model import (
    cache_dir,
    compute_dtype,
    load_saved,
    prepared_dir,
    resolve_model_path,
    safetensors_header,
    save_model,
)
from fedapp.pruning.structure import channel_group, live_blocks
from fedapp.pruning.surgery import KeptIndices, PruneResult
from fedapp.pruning.units import saved_config

META = "pruned.json"
COPY_CHUNK = 16 * 2**20  # bytes per read while streaming a tensor between files
STALE_SECONDS = 3600  # a temporary folder this old was left by a process that died writing


def store_size() -> int:
    return count_setting("FEDAPP_PRUNED_STORE")


def store_dir(model_path: str, quantization: str, device: str,
              units: Mapping[str, torch.Tensor]) -> Path:
    """The folder of the base `model_path` pruned to `units`, in `quantization` on `device`."""
    source = resolve_model_path(model_path)
    ident = prepared_dir(source, device).name  # the source's identity (a changed model differs)
    digest = hashlib.sha256(repr((ident, quantization, units_key(units))).encode())
    dtype = str(compute_dtype(device)).removeprefix("torch.")
    return cache_dir() / "pruned" / (f"{Path(source).name or 'model'}-{quantization}-{dtype}-"
                                     f"{digest.hexdigest()[:16]}")


def copy_tensors(folder: Path, names: Iterable[str], target: Path) -> list[str]:
    """Write the tensors `names` found in `folder`'s safetensors files to the safetensors
    file `target`, byte for byte and streamed (never whole in memory); the names found."""
    wanted, found = list(names), {}
    for file in sorted(folder.glob("*.safetensors")):
        start, header = safetensors_header(file)
        for name in wanted:
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
                    if not chunk:
                        raise OSError(f"{file} ends before its tensor data does")
                    out.write(chunk)
                    length -= len(chunk)
    return list(found)


def _write_tables(base: torch.nn.Module, config: object, folder: Path,
                  weights: Path | None) -> str | None:
    """nf4-embeddings: the layers' state in one file and the fp32 tables, streamed from
    the folder the base was loaded from, in another; why not, when they cannot be."""
    small = {name: m for name, m in base.named_modules() if isinstance(m, Nf4Embedding | Nf4Head)}
    if weights is None:
        return "no local folder holds its fp32 embedding (a Hub model without a local copy)"
    config.tie_word_embeddings = len(small) > 1 and len({m.table for m in small.values()}) == 1
    state = {k: v for k, v in base.state_dict().items()
             if not any(k.startswith(name + ".") for name in small)}
    files = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_model(base, config, folder, state, files[0])
    names = [f"{name}.weight" for name, m in small.items()  # a tied head is the embedding
             if isinstance(m, Nf4Embedding) or not config.tie_word_embeddings]
    found = copy_tensors(weights, names, folder / files[1])
    if len(found) != len(names):
        return f"{weights} lacks {sorted(set(names) - set(found))}"
    weight_map = dict.fromkeys(state, files[0]) | dict.fromkeys(found, files[1])
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    return None


def _write(copy: PrunedCopy, config: object, folder: Path, weights: Path | None) -> str | None:
    """Write `copy` into the new folder `folder`; why not, when it cannot be stored."""
    base = copy.base
    if any(isinstance(m, Nf4Embedding) for m in base.modules()):
        if (why := _write_tables(base, config, folder, weights)) is not None:
            return why
    else:
        save_model(base, config, folder)
    result = copy.result
    (folder / META).write_text(json.dumps({
        "kept": {k: [v.out_idx.tolist(), v.in_idx.tolist()] for k, v in result.kept.items()},
        "dropped": result.dropped, "params_before": result.params_before,
        "params_after": result.params_after,
        "full_costs": [[layer, kind, cost] for (layer, kind), cost in
                       copy.full_costs.items()],
        # decided on the unpruned block (`channel_group`); not readable from the pruned one
        "channel_groups": [[layer, channel_group(block)] for (layer, kind), block in
                           live_blocks(base).items() if kind == "mlp"]}))
    return None


def store_copy(copy: PrunedCopy, folder: Path, weights: Path | None) -> bool:
    """Keep `copy` (its LoRA removed) at `folder` unless it is there already or the store
    is off; `weights`: the folder the full base was loaded from (nf4-embeddings reads its
    fp32 embedding there). Whether the folder holds the copy now. Trims the store."""
    if (folder / META).exists():
        return True
    if store_size() == 0:
        return False
    try:
        config = saved_config(copy.base)
    except ValueError as err:  # dropped blocks: this structure is rebuilt by slicing
        log(DEBUG, "Pruned copy not stored: %s", err)
        return False
    stored = False
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
        try:
            if (why := _write(copy, config, tmp, weights)) is not None:
                log(INFO, "Pruned copy not stored: %s", why)
            else:
                try:
                    tmp.rename(folder)
                except OSError:  # another process stored it first, or left a broken folder
                    if not (folder / META).exists():
                        _discard(folder)
                        tmp.rename(folder)
                stored = (folder / META).exists()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        trim(folder.parent, store_size())
    except Exception as err:  # noqa: BLE001  a full or read-only disk, a failed write:
        # later rounds slice the base again; this round's work is not lost
        log(WARNING, "Pruned copy not stored at %s: %s", folder, err)
    return stored


def _discard(folder: Path) -> None:
    """Remove a stored copy so that no reader ever sees half of it: renamed aside first."""
    aside = folder.with_name(f"{folder.name}.tmp-gone-{time.monotonic_ns()}")
    try:
        folder.rename(aside)
    except OSError:
        return  # gone already
    shutil.rmtree(aside, ignore_errors=True)


def trim(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used stored copies under `root`, and
    temporary folders left by processes that died writing."""
    used: list[tuple[int, Path]] = []
    for path in root.iterdir() if root.is_dir() else []:
        try:
            if ".tmp-" in path.name:
                if time.time() - path.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            else:
                used.append(((path / META).stat().st_mtime_ns, path))
        except OSError:  # removed meanwhile, or a folder its writer never finished
            continue
    for _, old in sorted(used, reverse=True)[keep:]:
        _discard(old)


def load_copy(folder: Path, quantization: str, device: str,
              target_modules: tuple[str, ...]) -> PrunedCopy | None:
    """The stored copy at `folder`, loaded, its LoRA targets those of `target_modules`; None
    when the store is off or holds none there, or when it cannot be read (removed
    meanwhile, damaged: then it is removed, and the round slices the base instead)."""
    if store_size() == 0 or not (folder / META).exists():
        return None
    try:
        meta = json.loads((folder / META).read_text())
        result = PruneResult({k: KeptIndices(torch.tensor(o, dtype=torch.long),
                                             torch.tensor(i, dtype=torch.long))
                              for k, (o, i) in meta["kept"].items()}, meta["dropped"],
                             meta["params_before"], meta["params_after"])
        costs = {(layer, kind): cost for layer, kind, cost in meta["full_costs"]}
        base = load_saved(folder, quantization, device)
        blocks = live_blocks(base)
        for layer, size in meta["channel_groups"]:
            blocks[layer, "mlp"].fedapp_channel_group = size
    except (MemoryError, torch.OutOfMemoryError):
        raise  # the unpruned base would not fit either
    except Exception as err:  # noqa: BLE001  a cache: whatever is wrong with it (a file cut
        # short, bad JSON, safetensors' own errors) costs time only
        log(WARNING, "Stored pruned copy %s unreadable (%s); removed, slicing the base "
            "instead", folder, err)
        _discard(folder)
        return None
    try:
        (folder / META).touch()  # most recently used
    except OSError:
        pass  # a read-only store still serves its copies
    log(INFO, "Loaded the pruned base from %s", folder)
    return PrunedCopy(base, result, target_keys(base, target_modules), costs)
