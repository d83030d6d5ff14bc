"""FedSpine's client round on a tiny model: pruning with the frozen global adapter following
the pruned layers, replies that match their kept indices, ratio 0, bad orders, and a
configuration pruned once per process."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedapp.client import pruned
from fedapp.client.partition import partition_examples
from fedapp.client.round import probe_loss, run_round
from fedapp.config import compose_config, run_setup
from fedapp.llm.adapters import GLOBAL, PEFT_PREFIX, attach_lora, with_lora
from fedapp.llm.data import collate
from fedapp.llm.model import cached_base, load_base
from fedapp.pruning.surgery import PrunePlan, iterative_prune, parameter_count, prune_model
from fedapp.pruning.units import apply_units
from strategies.lora_math import LORA_A, LORA_B, join_factors, split_factors
from strategies.protocol import KEPT_IN, KEPT_OUT, PruneOrder, RunSetup, TrainOrder
from strategies.scatter import slice_factors

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_setup(tiny_model_dir, **kwargs) -> RunSetup:
    cfg = compose_config(f"model.path={tiny_model_dir} train.local_steps=6 "
                         "train.max_length=48 partitioner=iid")
    return dataclasses.replace(run_setup(cfg), **kwargs)


def spine_order(local_steps: int = 6, seed: int = 0, **prune) -> TrainOrder:
    return TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=local_steps,
                      seed=seed, global_mode="frozen", prune=PruneOrder(**prune))


def random_global(shapes: dict[str, tuple[int, int]], r: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    state = {}
    for key, (n_out, n_in) in shapes.items():
        state[key + LORA_A] = 0.1 * torch.randn(r, n_in, generator=gen)
        state[key + LORA_B] = 0.1 * torch.randn(n_out, r, generator=gen)
    return state


def peft_shapes(base: torch.nn.Module, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    return {PEFT_PREFIX + n: (m.out_features, m.in_features) for n, m in base.named_modules()
            if n.endswith(names)}


def test_global_adapter_follows_the_pruned_layers_exactly(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu")
    full = {PEFT_PREFIX + n: m.weight.detach().clone() for n, m in base.named_modules()
            if n.endswith(("q_proj", "o_proj"))}
    g = random_global(peft_shapes(base, ("q_proj", "o_proj")))
    model = attach_lora(base, 4, 8, ["q_proj", "o_proj"], seed=0, frozen_global=g)

    result = iterative_prune(model, 0.5, 2, lambda m: None, "magnitude")

    kept = {PEFT_PREFIX + n: (k.out_idx, k.in_idx) for n, k in result.kept.items()
            if PEFT_PREFIX + n in full}
    sliced = slice_factors(split_factors(g), kept)
    modules = dict(model.named_modules())
    assert len(kept) == 4 and not result.dropped  # q and o of both layers were cut
    for key, (a, b) in sliced.items():
        assert torch.equal(modules[key].lora_A[GLOBAL].weight, a), key
        assert torch.equal(modules[key].lora_B[GLOBAL].weight, b), key
    key = PEFT_PREFIX + "model.layers.1.self_attn.o_proj"
    rows, cols = kept[key]
    layer = modules[key]
    x = torch.randn(2, 3, layer.in_features)  # (batch, seq, in kept)
    with torch.no_grad():
        out = layer(x)
    a, b = split_factors(g)[key]
    oracle = x @ full[key][rows][:, cols].T + x @ (b[rows] @ a[:, cols]).T  # trained B is 0
    assert layer.in_features < full[key].shape[1]
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-4)


def test_slice_global_cuts_g_to_a_reused_copy_and_leaves_dropped_blocks_out(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu")
    g = random_global(peft_shapes(base, (*ATTENTION, "gate_proj")))
    result = prune_model(base, PrunePlan(kv_groups={0: [1]}, channels={1: [0, 3]},
                                         blocks=[(1, "self_attn")]))

    cut = split_factors(pruned.slice_global(g, result))

    gone = PEFT_PREFIX + "model.layers.1.self_attn."
    assert result.dropped == ["model.layers.1.self_attn"]
    assert set(cut) == {k for k in split_factors(g) if not k.startswith(gone)}
    for key, (a, b) in split_factors(g).items():
        if key.startswith(gone):
            continue
        kept = result.kept.get(key.removeprefix(PEFT_PREFIX))
        rows = torch.arange(b.shape[0]) if kept is None else kept.out_idx
        cols = torch.arange(a.shape[1]) if kept is None else kept.in_idx
        assert torch.equal(cut[key][0], a[:, cols]) and torch.equal(cut[key][1], b[rows]), key
    assert cut[PEFT_PREFIX + "model.layers.0.self_attn.q_proj"][1].shape == (32, 3)
    assert pruned.slice_global({}, result) == {}


def test_slice_global_takes_g_already_cut_by_the_server(tiny_model_dir):
    """FedSpine's server cuts G with the kept indices of the device's last reply; the client,
    rebuilt to that structure, must end up with the very factors it would cut from all of G."""
    base = load_base(str(tiny_model_dir), "none", "cpu")
    g = random_global(peft_shapes(base, (*ATTENTION, "gate_proj")))
    result = prune_model(base, PrunePlan(kv_groups={0: [1]}, channels={1: [0, 3]},
                                         blocks=[(1, "self_attn")]))
    reply = pruned.kept_arrays(result, list(split_factors(g)))
    kept = {k: (reply[k + KEPT_OUT], reply[k + KEPT_IN]) for k in split_factors(g)
            if k + KEPT_OUT in reply}
    sent = join_factors(slice_factors(split_factors(g), kept))

    from_cut, from_whole = pruned.slice_global(sent, result), pruned.slice_global(g, result)

    assert sum(v.numel() for v in sent.values()) < sum(v.numel() for v in g.values())
    assert from_cut.keys() == from_whole.keys()
    for key in from_whole:
        assert torch.equal(from_cut[key], from_whole[key]), key


def test_pruned_round_replies_factors_that_match_its_kept_indices(tiny_model_dir):
    setup = tiny_setup(tiny_model_dir)
    shapes = peft_shapes(cached_base(setup.model_path, "nf4", "cpu"), ATTENTION)
    before = parameter_count(cached_base(setup.model_path, "nf4", "cpu"))

    result = run_round(setup, spine_order(ratio=0.5, slices=2, tune_steps=2), 0, 2,
                       random_global(shapes), "cpu")

    factors, metrics, kept = split_factors(result.state), result.metrics, result.kept
    assert set(factors) == set(shapes)
    pruned_modules = 0
    for key, (a, b) in factors.items():
        rows, cols = kept.get(key + KEPT_OUT), kept.get(key + KEPT_IN)
        n_out = shapes[key][0] if rows is None else rows.numel()
        n_in = shapes[key][1] if cols is None else cols.numel()
        assert a.shape == (4, n_in) and b.shape == (n_out, 4)
        pruned_modules += (n_out, n_in) != shapes[key]
    assert all(v.dtype == torch.int64 for v in kept.values())
    assert pruned_modules > 0 and metrics["params-ratio"] < 0.85
    assert (metrics["prune-ratio"], metrics["pruned-before"]) == (0.5, 0.0)
    assert math.isfinite(metrics["loss-before"]) and math.isfinite(metrics["loss-after"])
    # just after the last slice: damaged by pruning, not yet repaired by its tuning
    assert metrics["loss-pruned"] != metrics["loss-before"]
    assert metrics["train-seconds"] >= metrics["tune-seconds"] > 0
    # the process's cached base, which unpruned rounds use, is untouched
    assert parameter_count(cached_base(setup.model_path, "nf4", "cpu")) == before


def test_ratio_zero_round_prunes_nothing_and_learns(tiny_model_dir):
    setup = tiny_setup(tiny_model_dir, lr=0.01)

    result = run_round(setup, spine_order(local_steps=12, ratio=0.0), 0, 2, {}, "cpu")

    assert result.kept == {} and result.metrics["params-ratio"] == 1.0
    assert result.metrics["loss-after"] < result.metrics["loss-before"]
    assert result.metrics["loss-pruned"] == result.metrics["loss-before"]  # nothing pruned


@pytest.mark.parametrize(("key", "value", "message"), [
    ("prune-criterion", "l1", "strategy.prune.criterion='l1'"),
    ("prune-slices", 7, "strategy.prune.slices=7; allowed: at most train.local_steps=6"),
    ("prune-ratio", 1.0, "scenario.devices.<class>.sparsity=1.0"),
    ("prune-reached", 0.75, "reached=0.75; allowed: 0 <= reached <= ratio"),
    ("prune-target", 1.0, "target=1.0; allowed: 0 <= target < 1"),
    ("global-mode", "init", "global-mode='init'"),
])
def test_bad_pruning_orders_name_the_key(key, value, message):
    record = spine_order(ratio=0.5, slices=2).to_config()
    record[key] = value

    with pytest.raises(ValueError, match=message):
        TrainOrder.from_dict(record)  # what the client does with a train message's config


@pytest.fixture()
def empty_pruned_cache(monkeypatch):
    monkeypatch.delenv("FEDAPP_PRUNED_CACHE", raising=False)
    pruned._COPIES.clear()
    yield
    pruned._COPIES.clear()


def structure_oracle(setup: RunSetup, units: dict[str, torch.Tensor],
                     g: dict[str, torch.Tensor]) -> float:
    """Probe loss of a fresh base sliced to `units` + G cut to it (the frozen global adapter
    beside a zero LoRA) on the first batch_size examples of partition 1 of 2."""
    examples, pad = partition_examples(setup, 2, 1)
    probe = collate(examples[:setup.batch_size], pad)
    base = load_base(setup.model_path, setup.quantization, "cpu")
    result = apply_units(base, units)
    with with_lora(base, 4, 8.0, list(setup.target_modules), 0,
                   frozen_global=pruned.slice_global(g, result)) as model:
        return probe_loss(model, probe)


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "fisher"])
def test_a_device_goes_on_from_the_structure_the_server_sends(tiny_model_dir, criterion,
                                                             empty_pruned_cache):
    # Prepare: plain weights, so that a rebuilt structure is bit-identical to a reused one
    setup = tiny_setup(tiny_model_dir, quantization="none")
    order = spine_order(ratio=0.5, criterion=criterion, slices=2, tune_steps=2)
    g = random_global(peft_shapes(cached_base(setup.model_path, "none", "cpu"), ATTENTION))
    first = run_round(setup, order, 1, 2, g, "cpu")
    stay = dataclasses.replace(order, seed=5, prune=dataclasses.replace(order.prune,
                                                                        reached=0.5))

    # Execute: the same ratio again from the structure reached, once from the process's
    # copy, once rebuilt from the base (a fresh process); then on to 0.75
    again = run_round(setup, stay, 1, 2, g, "cpu", units=first.units)
    pruned._COPIES.clear()
    rebuilt = run_round(setup, stay, 1, 2, g, "cpu", units=first.units)
    further = run_round(setup, dataclasses.replace(stay, prune=dataclasses.replace(
        stay.prune, ratio=0.75)), 1, 2, g, "cpu", units=first.units)

    # Assert: nothing more pruned at the same ratio, the copy reused or rebuilt alike
    assert first.units and first.metrics["sparsity"] == pytest.approx(0.5, abs=0.1)
    assert [r.metrics["pruned-before"] for r in (first, again, rebuilt)] == [0.0, 1.0, 0.0]
    for result in (again, rebuilt):
        assert result.units.keys() == first.units.keys()
        assert all(torch.equal(result.units[k], first.units[k]) for k in first.units)
        assert all(torch.equal(result.kept[k], first.kept[k]) for k in first.kept)
        assert result.metrics["params-ratio"] == first.metrics["params-ratio"]
        # L_before is the structure's own loss (+ G): the device never holds the full model
        assert result.metrics["loss-before"] == pytest.approx(
            structure_oracle(setup, first.units, g), rel=1e-5)
    # pruning goes on from the structure: only further, to about 0.75
    assert further.metrics["sparsity"] == pytest.approx(0.75, abs=0.1)
    assert further.metrics["sparsity"] > first.metrics["sparsity"]
    assert set(first.units) <= set(further.units)
    for key, kept in first.units.items():
        assert set(further.units[key].tolist()) <= set(kept.tolist())


def test_no_copy_is_kept_when_the_cache_size_is_zero(tiny_model_dir, empty_pruned_cache,
                                                    monkeypatch):
    monkeypatch.setenv("FEDAPP_PRUNED_CACHE", "0")
    setup = tiny_setup(tiny_model_dir)
    order = spine_order(local_steps=2, ratio=0.5, criterion="magnitude")

    first = run_round(setup, order, 1, 2, {}, "cpu")
    again = run_round(setup, order, 1, 2, {}, "cpu", units=first.units)

    assert len(pruned._COPIES) == 0
    assert (first.metrics["pruned-before"], again.metrics["pruned-before"]) == (0.0, 0.0)


def test_a_copy_is_reused_only_by_the_same_setup_and_partitioning(tiny_model_dir,
                                                                   empty_pruned_cache):
    # Prepare: one pruned round on q/v of partition 0 of 2
    setup = tiny_setup(tiny_model_dir, quantization="none", target_modules=("q_proj", "v_proj"))
    wider = dataclasses.replace(setup, target_modules=ATTENTION)
    order = spine_order(local_steps=2, ratio=0.5, criterion="magnitude")
    units = run_round(setup, order, 0, 2, {}, "cpu").units

    # Execute: other targets, then another partitioning, then the same configuration again
    other_targets = run_round(wider, order, 0, 2, {}, "cpu", units=units)
    other_split = run_round(setup, order, 0, 4, {}, "cpu", units=units)
    same = run_round(setup, order, 0, 2, {}, "cpu", units=units)

    # Assert: only the identical configuration reuses its copy; a reply names kept indices
    # for every module it sends (4 attention modules × 2 layers)
    assert other_targets.metrics["pruned-before"] == 0.0
    assert other_split.metrics["pruned-before"] == 0.0
    assert same.metrics["pruned-before"] == 1.0
    assert len(split_factors(other_targets.state)) == 8 == len(other_targets.kept) // 2


@pytest.mark.parametrize(("target", "removed"), [(0.3, 11136), (0.0, 13440)])
def test_a_device_ends_at_the_same_sparsity_in_one_round_or_two(tiny_model_dir, target,
                                                                 removed, empty_pruned_cache):
    """The tiny layer at 0.3 loses 1 KV group + 26 channels (6144 + 26 × 192 = 11136 of
    36864), at 0.2 no group but 38 channels; told its target, a device stopping at 0.2 on
    the way removes no more than 26, and ends where one round to 0.3 ends. Not told
    (target 0), it keeps its 38 channels and ends at 6144 + 38 × 192 = 13440."""
    setup = tiny_setup(tiny_model_dir, quantization="none")
    order = spine_order(ratio=0.3, criterion="magnitude", slices=2, tune_steps=2,
                        target=target)
    once = run_round(setup, order, 1, 2, {}, "cpu")
    pruned._COPIES.clear()
    halfway = run_round(setup, dataclasses.replace(order, prune=dataclasses.replace(
        order.prune, ratio=0.2)), 1, 2, {}, "cpu")
    twice = run_round(setup, dataclasses.replace(order, prune=dataclasses.replace(
        order.prune, reached=0.2)), 1, 2, {}, "cpu", units=halfway.units)

    assert once.metrics["sparsity"] == pytest.approx(11136 / 36864)
    assert twice.metrics["sparsity"] == pytest.approx(removed / 36864)
