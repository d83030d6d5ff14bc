"""A device's pruned bases on its disk (`fedapp.client.store`): stored after the round that
reached a structure, loaded by a later round instead of the unpruned base, identical to
the copy that was stored; off, capped and refused where a stock config cannot hold them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fedapp.client import pruned
from fedapp.client import round as client_round
from fedapp.client import store as store_module
from fedapp.client.pruned import PrunedCopy
from fedapp.client.round import run_round, target_keys
from fedapp.client.store import copy_tensors, load_copy, store_copy, store_dir, store_size
from fedapp.config import compose_config, run_setup
from fedapp.llm.embedding import Nf4Embedding
from fedapp.llm.model import load_base, weights_folder
from fedapp.llm.unequal import load_pretrained
from fedapp.pruning.importance import block_costs
from fedapp.pruning.structure import channel_group, live_blocks
from fedapp.pruning.surgery import PrunePlan, compose, parameter_count, prune_model
from fedapp.pruning.units import apply_units, units_of
from strategies.protocol import PruneOrder, TrainOrder

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# one KV group and two whole 4-bit channel groups kept in each layer: a stock shape
UNITS = {"0.self_attn": torch.tensor([1]), "1.self_attn": torch.tensor([0]),
         "0.mlp": torch.arange(64, 192), "1.mlp": torch.arange(0, 128)}
# layer 0 pruned, layer 1 whole (a global allocation's kind of result): no stock config
UNEQUAL = {"0.self_attn": torch.tensor([1]), "0.mlp": torch.arange(64, 192)}


@pytest.fixture()
def store(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDAPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDAPP_PRUNED_STORE", raising=False)
    pruned._COPIES.clear()
    yield tmp_path / "cache" / "pruned"
    pruned._COPIES.clear()


def pruned_copy(path: str, quantization: str, units=UNITS) -> PrunedCopy:
    base = load_base(path, quantization, "cpu")
    full, targets = block_costs(base), target_keys(base, ATTENTION)
    return PrunedCopy(base, apply_units(base, units), targets, full)


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("units", [UNITS, UNEQUAL], ids=["stock", "unequal"])
@pytest.mark.parametrize("quantization", ["none", "nf4", "nf4-embeddings"])
def test_a_stored_copy_loads_as_the_copy_that_was_stored(wide_dir, store, quantization, units):
    # Prepare
    copy = pruned_copy(wide_dir, quantization, units)
    folder = store_dir(wide_dir, quantization, "cpu", units)

    # Execute
    stored = store_copy(copy, folder, weights_folder(wide_dir, quantization, "cpu"))
    loaded = load_copy(folder, quantization, "cpu", ATTENTION)

    # Assert: the same computation (4-bit codes kept, nothing quantised twice), the same
    # bookkeeping, and a folder that plain transformers (unequal layers:
    # fedapp.llm.unequal) loads in one call
    assert stored and loaded is not None and folder.parent == store
    torch.testing.assert_close(logits(loaded.base), logits(copy.base), rtol=0, atol=0)
    assert parameter_count(loaded.base) == parameter_count(copy.base)
    assert loaded.result.kept.keys() == copy.result.kept.keys()
    for name, kept in copy.result.kept.items():
        assert torch.equal(loaded.result.kept[name].out_idx, kept.out_idx.long())
        assert torch.equal(loaded.result.kept[name].in_idx, kept.in_idx.long())
    assert (loaded.result.dropped, loaded.result.params_before, loaded.result.params_after) \
        == (copy.result.dropped, copy.result.params_before, copy.result.params_after)
    assert (loaded.targets, loaded.full_costs) == (copy.targets, copy.full_costs)
    assert isinstance(loaded.base.get_input_embeddings(), Nf4Embedding) \
        == (quantization == "nf4-embeddings")
    if units is UNEQUAL:
        plain = load_pretrained(folder)
        layers = plain.model.layers
        assert [layer.mlp.up_proj.out_features for layer in layers] == [128, 512]
        assert [layer.self_attn.k_proj.out_features for layer in layers] == [16, 32]
        assert [layer.self_attn.q_proj.out_features for layer in layers] == [32, 64]
        if quantization != "nf4-embeddings":  # which it loads with its fp32 embedding
            torch.testing.assert_close(logits(plain), logits(copy.base), rtol=0, atol=1e-5
                                       if quantization == "none" else 0.05)
    else:
        plain = AutoModelForCausalLM.from_pretrained(folder)
        assert plain.config.intermediate_size == 128 and plain.config.num_key_value_heads == 1
    assert plain.config.tie_word_embeddings
    source = load_base(wide_dir, "none", "cpu").get_input_embeddings().weight
    assert torch.equal(plain.get_input_embeddings().weight, source)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_later_round_loads_the_stored_structure_and_never_the_full_base(
        tiny_model_dir, store, monkeypatch, quantization):
    # Prepare: a pruned round (LoRA on q/v), then the rebuild by slicing a store-less
    # process does, with LoRA on all four attention projections
    cfg = compose_config(f"model.path={tiny_model_dir} train.local_steps=2 "
                         "train.max_length=48 partitioner=iid")
    setup = dataclasses.replace(run_setup(cfg), quantization=quantization,
                                target_modules=("q_proj", "v_proj"))
    wider = dataclasses.replace(setup, target_modules=ATTENTION)
    order = TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=2, seed=0,
                       global_mode="frozen",  # one slice: the rebuild slices the same once
                       prune=PruneOrder(ratio=0.5, criterion="magnitude", slices=1))
    first = run_round(setup, order, 1, 2, {}, "cpu")
    stay = dataclasses.replace(order, prune=dataclasses.replace(order.prune, reached=0.5))
    pruned._COPIES.clear()
    monkeypatch.setenv("FEDAPP_PRUNED_STORE", "0")  # off: not read either
    rebuilt = run_round(wider, stay, 1, 2, {}, "cpu", units=first.units)
    monkeypatch.delenv("FEDAPP_PRUNED_STORE")
    pruned._COPIES.clear()

    def refused(*args):
        raise AssertionError("the unpruned base was loaded")

    monkeypatch.setattr(client_round, "load_base", refused)

    # Execute: a fresh process's round at the structure reached
    loaded = run_round(wider, stay, 1, 2, {}, "cpu", units=first.units)

    # Assert: stored once, and the round from it equals the one rebuilt by slicing; its
    # reply names kept indices for the modules this round trained (4 × 2 layers)
    assert len(list(store.iterdir())) == 1
    assert len(loaded.kept) == 2 * 8 == len(rebuilt.kept)
    assert (loaded.metrics["pruned-stored"], rebuilt.metrics["pruned-stored"]) == (1.0, 0.0)
    assert first.metrics["pruned-stored"] == loaded.metrics["pruned-before"] == 0.0
    assert loaded.metrics["loss-before"] == rebuilt.metrics["loss-before"]
    assert loaded.state.keys() == rebuilt.state.keys()
    assert all(torch.equal(loaded.state[k], rebuilt.state[k]) for k in rebuilt.state)
    assert all(torch.equal(loaded.kept[k], rebuilt.kept[k]) for k in rebuilt.kept)
    assert loaded.metrics["sparsity"] == rebuilt.metrics["sparsity"]


def test_dropped_blocks_are_not_stored(wide_dir, store):
    base = load_base(wide_dir, "none", "cpu")
    copy = PrunedCopy(base, prune_model(base, PrunePlan(blocks=[(1, "mlp")])), [], {})
    assert not store_copy(copy, store_dir(wide_dir, "none", "cpu", {"x": torch.zeros(1)}), None)
    assert not store.exists() or not any(store.iterdir())  # nor a temporary folder left


def test_the_store_can_be_off_and_keeps_the_most_recently_used(wide_dir, store, monkeypatch):
    # off: nothing written
    monkeypatch.setenv("FEDAPP_PRUNED_STORE", "0")
    assert not store_copy(pruned_copy(wide_dir, "none"), store_dir(wide_dir, "none", "cpu",
                                                                   UNITS), None)
    monkeypatch.setenv("FEDAPP_PRUNED_STORE", "2")
    structures = [UNITS, {**UNITS, "1.mlp": torch.arange(128, 256)},
                  {**UNITS, "1.mlp": torch.arange(256, 384)}]
    folders = [store_dir(wide_dir, "none", "cpu", u) for u in structures]

    for units, folder in zip(structures[:2], folders, strict=False):
        assert store_copy(pruned_copy(wide_dir, "none", units), folder, None)
    assert load_copy(folders[0], "none", "cpu", ATTENTION) is not None  # now most recent
    stale, fresh = store / "x.tmp-dead", store / "y.tmp-writing"  # left by a dead writer;
    for folder in (stale, fresh):  # being written now
        folder.mkdir()
    os.utime(stale, (0, 0))
    assert store_copy(pruned_copy(wide_dir, "none", structures[2]), folders[2], None)

    assert sorted(store.iterdir()) == sorted([folders[0], folders[2], fresh])
    assert load_copy(folders[1], "none", "cpu", ATTENTION) is None
    monkeypatch.setenv("FEDAPP_PRUNED_STORE", "many")
    with pytest.raises(ValueError, match=r"FEDAPP_PRUNED_STORE='many'; allowed: an integer"):
        store_size()


def test_a_damaged_or_unwritable_store_costs_time_never_the_round(wide_dir, store,
                                                                  monkeypatch):
    folder = store_dir(wide_dir, "nf4", "cpu", UNITS)
    assert store_copy(pruned_copy(wide_dir, "nf4"), folder, None)
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)  # damaged: cut short
    assert load_copy(folder, "nf4", "cpu", ATTENTION) is None
    assert not folder.exists()  # removed: the next round stores it again
    assert store_copy(pruned_copy(wide_dir, "nf4"), folder, None)
    (folder / "pruned.json").write_text("{")
    assert load_copy(folder, "nf4", "cpu", ATTENTION) is None and not folder.exists()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "_write", full_disk)
    other = store_dir(wide_dir, "none", "cpu", UNITS)
    assert not store_copy(pruned_copy(wide_dir, "none"), other, None)
    assert not other.exists() and not list(store.glob("*.tmp-*"))


def test_copy_tensors_streams_the_named_tensors_byte_for_byte(wide_dir, tmp_path):
    target = tmp_path / "out.safetensors"

    load_dir = Path(wide_dir)
    found = copy_tensors(load_dir,
                         ["model.embed_tokens.weight", "model.norm.weight", "absent"], target)

    assert found == ["model.embed_tokens.weight", "model.norm.weight"]
    with safe_open(target, "pt") as out, safe_open(load_dir / "model.safetensors", "pt") as src:
        assert sorted(out.keys()) == found
        for name in found:
            assert torch.equal(out.get_tensor(name), src.get_tensor(name))


def test_a_reloaded_copy_keeps_whole_channel_groups_when_pruned_further(wide_dir, store):
    # Prepare: layer 0 keeps 2 of its 8 channel groups (64 wide), fewer than the 8 a block
    # needs for its group size to be decided on it
    copy = pruned_copy(wide_dir, "nf4", UNEQUAL)
    folder = store_dir(wide_dir, "nf4", "cpu", UNEQUAL)
    assert store_copy(copy, folder, weights_folder(wide_dir, "nf4", "cpu"))

    # Execute: a later round's process loads it and prunes one more unit of layer 0's MLP
    loaded = load_copy(folder, "nf4", "cpu", ATTENTION)
    mlp = live_blocks(loaded.base)[0, "mlp"]
    further = prune_model(loaded.base, PrunePlan(channels={0: [0]}))
    units = units_of(loaded.base, compose(loaded.result, further))

    # Assert: the unit is still a whole 4-bit group, so the server rebuilds the structure
    assert channel_group(mlp) == 64 and mlp.up_proj.out_features == 64
    assert units["0.mlp"].tolist() == list(range(128, 192))
    rebuilt = load_base(wide_dir, "nf4", "cpu")
    apply_units(rebuilt, units)
    torch.testing.assert_close(logits(rebuilt), logits(loaded.base), rtol=0, atol=0)
