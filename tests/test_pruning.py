"""Structured pruning on the tiny Llama (hidden 64, 2 layers, 4 heads / 2 KV heads, MLP 128).

Hand arithmetic used below: head_dim 16, 2 query heads per KV group, so one KV group is
q rows 2·16·64 + k rows 16·64 + v rows 16·64 + o columns 2·16·64 = 6144 parameters; one MLP
channel is gate row + up row + down column = 3·64 = 192; a layer's prunable parameters are
12288 (attention) + 24576 (MLP) = 36864; the whole model has 139584.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedapp.llm.adapters import attach_lora
from fedapp.llm.model import load_base
from fedapp.pruning.importance import (
    ImportanceTracker,
    llm_drop_importance,
    magnitude_importance,
    score,
    taylor_importance,
)
from fedapp.pruning.structure import DroppedBlock, dense_weight
from fedapp.pruning.surgery import (
    PrunePlan,
    compose,
    expected_parameter_count,
    iterative_prune,
    parameter_count,
    plan_pruning,
    prunable_parameter_count,
    prune_model,
    slice_linear,
)

GROUP, CHANNEL, LAYER, FULL = 6144, 192, 36864, 139584
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTS = ["nf4", "none"]


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 1024, (2, 16), generator=gen),
            "attention_mask": torch.ones(2, 16, dtype=torch.long)}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def backward_with_lora(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = attach_lora(base, r=4, lora_alpha=8, target_modules=TARGETS, seed=0)
    model.train()
    ids = batch()["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def sgd_tune(model: torch.nn.Module, steps: int = 2) -> None:
    """What a client's tune_fn does: a fresh optimizer over the current LoRA parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for step in range(steps):
        ids = batch(step)["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("quant", QUANTS)
def test_ratio_zero_is_the_identity(tiny_model_dir, quant):
    base = load_base(str(tiny_model_dir), quant, "cpu")
    before = logits(base, batch())

    result = prune_model(base, plan_pruning(magnitude_importance(base), 0.0))

    assert result.kept == {} and result.dropped == []
    assert result.params_before == result.params_after == FULL
    torch.testing.assert_close(logits(base, batch()), before, rtol=0, atol=0)


@pytest.mark.parametrize("quant", QUANTS)
def test_pruned_model_trains_with_lora(tiny_model_dir, quant):
    base = load_base(str(tiny_model_dir), quant, "cpu")
    plan = plan_pruning(magnitude_importance(base), 0.5)

    prune_model(base, plan)
    grads = backward_with_lora(base)

    attn, mlp = base.model.layers[0].self_attn, base.model.layers[0].mlp
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (
        32, 16, 32)
    assert (mlp.up_proj.out_features, mlp.down_proj.in_features) == (64, 64)
    assert len(grads) == 2 * 2 * len(TARGETS)
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        if "lora_B" in name:  # lora_A's gradient is zero while B = 0 (peft's init)
            assert grad.abs().sum() > 0, name
    if quant == "nf4":
        assert all(not m.support_avx512bf16_for_cpu for m in base.modules()
                   if hasattr(m, "support_avx512bf16_for_cpu"))


@pytest.mark.parametrize("quant", QUANTS)
def test_parameter_count_matches_hand_arithmetic(tiny_model_dir, quant):
    base = load_base(str(tiny_model_dir), quant, "cpu")
    plan = PrunePlan(kv_groups={0: [1], 1: [0]}, channels={0: list(range(32)), 1: [5, 7]})

    result = prune_model(base, plan)

    expected = FULL - 2 * GROUP - 34 * CHANNEL
    assert parameter_count(base) == result.params_after == expected
    assert expected_parameter_count(base.config, plan) == expected
    assert prunable_parameter_count(base) == 2 * LAYER - 2 * GROUP - 34 * CHANNEL


def test_kept_indices_match_new_shapes_and_weights(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu")
    full = {n: m.weight.detach().clone() for n, m in base.named_modules()
            if isinstance(m, torch.nn.Linear)}

    result = prune_model(base, PrunePlan(kv_groups={0: [1]}, channels={1: [0, 3, 127]}))

    modules = dict(base.named_modules())
    assert len(result.kept) == 4 + 3
    for name, kept in result.kept.items():
        weight = modules[name].weight
        assert weight.shape == (len(kept.out_idx), len(kept.in_idx)), name
        assert torch.equal(weight, full[name][kept.out_idx][:, kept.in_idx]), name
    q = result.kept["model.layers.0.self_attn.q_proj"]
    k = result.kept["model.layers.0.self_attn.k_proj"]
    o = result.kept["model.layers.0.self_attn.o_proj"]
    assert q.out_idx.tolist() == list(range(32)) == o.in_idx.tolist()  # heads 0, 1 = group 0
    assert k.out_idx.tolist() == list(range(16))
    down = result.kept["model.layers.1.mlp.down_proj"]
    assert down.in_idx.tolist() == [c for c in range(128) if c not in (0, 3, 127)]


def test_lora_attached_before_pruning_is_sliced_with_the_base(tiny_model_dir):
    model = attach_lora(load_base(str(tiny_model_dir), "nf4", "cpu"), 4, 8, TARGETS, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    result = prune_model(model, PrunePlan(kv_groups={1: [0]}, channels={0: list(range(64))}))

    params = dict(model.named_parameters())
    for name, kept in result.kept.items():
        a = f"base_model.model.{name}.lora_A.default.weight"
        b = f"base_model.model.{name}.lora_B.default.weight"
        assert torch.equal(params[a], before[a][:, kept.in_idx]), a
        assert torch.equal(params[b], before[b][kept.out_idx]), b
    ids = batch()["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for n, p in params.items() if "lora_" in n)


def test_requantised_slice_matches_the_dequantised_slice(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "nf4", "cpu")
    layer = base.model.layers[0].mlp.down_proj  # (64, 128) NF4, blocksize 64
    full = dense_weight(layer)
    rows, cols = torch.arange(0, 64, 2), torch.arange(0, 128, 3)
    x = torch.randn(8, len(cols))

    rows_only = slice_linear(layer, rows, torch.arange(128))
    both = slice_linear(layer, rows, cols)

    # whole rows are whole NF4 blocks: re-quantising them reproduces the values exactly
    torch.testing.assert_close(dense_weight(rows_only), full[rows], rtol=0, atol=0)
    reference = full[rows][:, cols]
    assert (dense_weight(both) - reference).norm() / reference.norm() < 0.1  # NF4 step ≈ 8 %
    with torch.no_grad():
        out = both(x)  # (8, 32), computed in the layer's compute dtype
    assert (out - x @ reference.T).norm() / (x @ reference.T).norm() < 0.1
    assert type(both) is type(layer) and both.weight.quant_state.quant_type == "nf4"
    assert both.weight.quant_state.blocksize == layer.weight.quant_state.blocksize


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "fisher"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_unit_criteria_score_every_unit_and_plan_the_share(tiny_model_dir, criterion, ratio):
    base = load_base(str(tiny_model_dir), "none", "cpu")

    importance = score(base, criterion, [batch(0), batch(1)])
    result = prune_model(base, plan_pruning(importance, ratio))

    assert set(importance.units) == {(0, "self_attn"), (0, "mlp"), (1, "self_attn"), (1, "mlp")}
    for (_, kind), scores in importance.units.items():
        assert scores.shape == ((2,) if kind == "self_attn" else (128,)) and (scores >= 0).all()
    removed = 1 - prunable_parameter_count(base) / (2 * LAYER)
    assert removed == pytest.approx(ratio, abs=CHANNEL / LAYER)
    for i in (0, 1):  # the least important units went
        kept = result.kept[f"model.layers.{i}.mlp.down_proj"].in_idx
        lost = torch.ones(128, dtype=torch.bool).index_fill(0, kept, False)
        channels = importance.units[i, "mlp"]
        assert channels[lost].max() <= channels[kept].min()


def test_taylor_equals_weight_gradient_times_weight_with_ema(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu").requires_grad_(True)
    oracle = []
    for seed in (0, 1):  # |Σ g·w| over each unit's o_proj columns / down_proj column
        base.zero_grad()
        ids = batch(seed)["input_ids"]
        base(input_ids=ids, labels=ids).loss.backward()
        o, down = base.model.layers[1].self_attn.o_proj, base.model.layers[1].mlp.down_proj
        oracle.append(((o.weight.grad * o.weight).sum(0).view(2, 32).sum(1).abs(),
                       (down.weight.grad * down.weight).sum(0).abs()))
    base.zero_grad()

    importance = taylor_importance(base, [batch(0), batch(1)], beta=0.75)

    groups = 0.75 * oracle[0][0] + 0.25 * oracle[1][0]
    channels = 0.75 * oracle[0][1] + 0.25 * oracle[1][1]
    torch.testing.assert_close(importance.units[1, "self_attn"], groups, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(importance.units[1, "mlp"], channels, rtol=1e-4, atol=1e-9)


class RecordingTracker(ImportanceTracker):
    """Keeps every step's raw (signed) scores before they enter the EMA."""

    def __init__(self, *args, **kwargs) -> None:
        self.raw: list[dict] = []
        super().__init__(*args, **kwargs)

    def step(self) -> None:
        self.raw.append({k: v.clone() for k, v in self._pending.items()})
        super().step()


def test_tracker_learns_from_lora_training_steps(tiny_model_dir):
    model = attach_lora(load_base(str(tiny_model_dir), "nf4", "cpu"), 4, 8, TARGETS, seed=0)

    with RecordingTracker(model, beta=0.5) as tracker:
        sgd_tune(model, steps=3)  # a plain training loop: it never calls tracker.step()
        importance = tracker.importance()

    assert tracker.steps == 3  # each optimizer step closed one
    for key, ema in importance.units.items():  # s1, then 0.5 s + 0.5 |s2|, then |s3|
        s1, s2, s3 = (raw[key].abs() for raw in tracker.raw)
        torch.testing.assert_close(ema, 0.5 * (0.5 * s1 + 0.5 * s2) + 0.5 * s3)
    sgd_tune(model, steps=1)  # after the tracker is removed, steps no longer reach it
    assert tracker.steps == 3
    assert len(importance.units) == 4 and all(s.sum() > 0 for s in importance.units.values())
    assert all(s.shape == (2,) for (_, k), s in importance.units.items() if k == "self_attn")


def test_llm_drop_drops_whole_blocks(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "nf4", "cpu")

    importance = llm_drop_importance(base, [batch(0), batch(1)])
    plan = plan_pruning(importance, 0.3)
    result = prune_model(base, plan)

    assert set(importance.blocks) == {(0, "self_attn"), (0, "mlp"), (1, "self_attn"), (1, "mlp")}
    assert all(0 <= s <= 2 for s in importance.blocks.values())
    assert plan.blocks and len({i for i, _ in plan.blocks}) == len(plan.blocks)  # one a layer
    for layer, kind in plan.blocks:
        assert isinstance(getattr(base.model.layers[layer], kind), DroppedBlock)
    assert result.dropped == [f"model.layers.{i}.{kind}" for i, kind in plan.blocks]
    sizes = {"self_attn": 12288, "mlp": 24576}
    dropped = sum(sizes[kind] for _, kind in plan.blocks)
    assert result.params_before - result.params_after == dropped
    assert parameter_count(base) == expected_parameter_count(base.config, plan)
    grads = backward_with_lora(base)
    lost = sum(4 if kind == "self_attn" else 3 for _, kind in plan.blocks)
    assert len(grads) == 2 * (2 * len(TARGETS) - lost)


def test_large_ratio_cuts_flops_and_parameters(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu").requires_grad_(True)
    ids = batch()["input_ids"]

    def flops() -> int:
        with FlopCounterMode(display=False) as counter:
            base(input_ids=ids, labels=ids).loss.backward()
        return counter.get_total_flops()

    before, params_before = flops(), prunable_parameter_count(base)
    prune_model(base, plan_pruning(magnitude_importance(base), 0.8))
    after, params_after = flops(), prunable_parameter_count(base)

    assert params_after / params_before == pytest.approx(0.2, abs=0.01)
    # lm_head (64 × 1024 per token) is never pruned: the layers' share of the FLOPs drops 80 %
    assert after < 0.7 * before


def test_pruning_unimportant_channels_hurts_less(tiny_model_dir):
    inputs = batch()
    reference = logits(load_base(str(tiny_model_dir), "nf4", "cpu"), inputs)
    errors = []
    for sign in (1, -1):  # least important first, then the most important
        base = load_base(str(tiny_model_dir), "nf4", "cpu")
        importance = magnitude_importance(base)
        importance.units = {key: sign * s for key, s in importance.units.items()}
        prune_model(base, plan_pruning(importance, 0.5))
        errors.append(float((logits(base, inputs) - reference).norm()))

    assert errors[0] < errors[1]


@pytest.mark.parametrize(("criterion", "calibrate"), [
    ("taylor", True), ("taylor", False), ("fisher", False), ("magnitude", False),
    ("llm-drop", True)])
def test_iterative_prune_reaches_the_target_with_lora(tiny_model_dir, criterion, calibrate):
    model = attach_lora(load_base(str(tiny_model_dir), "nf4", "cpu"), 4, 8, TARGETS, seed=0)
    full = {n: (m.out_features, m.in_features) for n, m in
            model.get_base_model().named_modules() if n.endswith("_proj")}
    calls = []

    def tune(m: torch.nn.Module) -> None:
        calls.append(prunable_parameter_count(m))
        sgd_tune(m)

    batches = [batch(0)] if calibrate else None
    result = iterative_prune(model, 0.5, 3, tune, criterion, batches=batches)

    # without calibration batches, Taylor scores its first slice on an extra tune_fn run
    calls = calls if calibrate or criterion not in ("taylor", "fisher") else calls[1:]
    assert len(calls) == 3 and calls == sorted(calls, reverse=True)
    removed = 1 - prunable_parameter_count(model) / (2 * LAYER)
    # llm-drop moves in whole blocks (an attention block is 1/6 of the prunable parameters)
    assert removed == pytest.approx(0.5, abs=1 / 6 + 1e-6 if criterion == "llm-drop" else 0.02)
    modules = dict(model.get_base_model().named_modules())
    for name, kept in result.kept.items():  # composed indices point into the full shapes
        assert (modules[name].out_features, modules[name].in_features) == (
            len(kept.out_idx), len(kept.in_idx))
        assert kept.out_idx.max() < full[name][0] and kept.in_idx.max() < full[name][1]
        assert kept.in_idx.unique().numel() == len(kept.in_idx)
    assert result.params_before - result.params_after > 0


def test_successive_prunings_compose_to_full_indices(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu")
    full = {n: m.weight.detach().clone() for n, m in base.named_modules()
            if isinstance(m, torch.nn.Linear)}

    first = prune_model(base, PrunePlan(kv_groups={0: [0]}, channels={0: list(range(0, 128, 2))}))
    then = prune_model(base, PrunePlan(channels={0: [0, 1, 63], 1: [9]}))
    result = compose(first, then)

    modules = dict(base.named_modules())
    down = result.kept["model.layers.0.mlp.down_proj"]
    assert down.in_idx.tolist() == [c for c in range(1, 128, 2) if c not in (1, 3, 127)]
    for name, kept in result.kept.items():
        assert torch.equal(modules[name].weight, full[name][kept.out_idx][:, kept.in_idx]), name
    assert (result.params_before, result.params_after) == (FULL, parameter_count(base))


def test_bad_arguments_name_the_value(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "none", "cpu")
    with pytest.raises(ValueError, match="ratio=1.0"):
        plan_pruning(magnitude_importance(base), 1.0)
    with pytest.raises(ValueError, match="removing all 2"):
        prune_model(base, PrunePlan(kv_groups={0: [0, 1]}))
    with pytest.raises(ValueError, match=r"criterion='wanda'; allowed: \['magnitude', 'taylor', "
                       r"'fisher', 'llm-drop'\]"):
        score(base, "wanda")
    with pytest.raises(ValueError, match="criterion='fisher' needs calibration batches"):
        score(base, "fisher")
    with pytest.raises(ValueError, match=r"layer 5 mlp is out of range"):
        prune_model(base, PrunePlan(channels={5: [0]}))


def test_mlp_units_of_whole_4bit_blocks_prune_without_new_weight_error(tmp_path):
    """An MLP of 8 quantisation blocks per down_proj row (intermediate 512): its units are
    64 channels wide, and the kept down_proj weights re-quantise to exactly what they were.
    With single channels (the tiny model's 2 blocks: below MIN_CHANNEL_GROUPS) they do not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedapp.pruning.structure import channel_group, num_units

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=512,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    wide = load_base(str(tmp_path / "wide"), "nf4", "cpu")
    mlp = wide.model.layers[0].mlp
    before = dense_weight(mlp.down_proj)  # (64, 512)
    assert channel_group(mlp) == 64 and num_units(mlp, "mlp") == 8

    result = prune_model(wide, PrunePlan(channels={0: [1, 6]}))

    kept = result.kept["model.layers.0.mlp.down_proj"].in_idx
    assert kept.tolist() == [*range(64), *range(128, 384), *range(448, 512)]
    assert torch.equal(dense_weight(wide.model.layers[0].mlp.down_proj), before[:, kept])
    assert wide.model.layers[0].mlp.intermediate_size == 384

    tiny = load_base(str(tmp_path / "wide"), "nf4", "cpu")
    mixed = tiny.model.layers[0].mlp
    sliced = slice_linear(mixed.down_proj, torch.arange(64), torch.arange(1, 512, 2))
    error = (dense_weight(sliced) - before[:, 1::2]).norm() / before[:, 1::2].norm()
    assert error > 0.01  # single channels from every block: new blocks, new rounding
