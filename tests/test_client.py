"""The client side on a tiny 4-bit model: local rounds, the frozen global adapter, orders."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedapp.client.round import run_round
from fedapp.llm.adapters import GLOBAL, TRAINED, attach_lora, detach_lora, lora_state
from fedapp.llm.model import cached_base, load_base
from strategies.protocol import PruneOrder, RunSetup, TrainOrder

TARGETS = ("q_proj", "v_proj")


@pytest.fixture()
def setup(tiny_model_dir) -> RunSetup:
    return RunSetup(model_path=str(tiny_model_dir), quantization="nf4", target_modules=TARGETS,
                    lr=1e-2, batch_size=4, max_length=64, partitioner="iid",
                    partitioner_alpha=0.0)


@pytest.fixture()
def order() -> TrainOrder:
    return TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=3, seed=0)


def random_adapter(base, r: int, seed: int) -> dict[str, torch.Tensor]:
    model = attach_lora(base, r, float(r), list(TARGETS), seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    state = lora_state(model)
    detach_lora(model)
    return state


def test_setup_and_order_survive_the_config_record(setup, order):
    pruning = dataclasses.replace(order, global_mode="frozen",
                                  prune=PruneOrder(0.25, "magnitude", slices=2, tune_steps=1))
    record = setup.to_config()

    assert RunSetup.from_dict(record) == setup
    assert TrainOrder.from_dict(order.to_config()) == order  # no prune-* keys: prune None
    assert TrainOrder.from_dict(pruning.to_config()) == pruning
    assert pruning.to_config()["prune-ratio"] == 0.25
    del record["lr"]
    with pytest.raises(KeyError, match="lacks 'lr'"):
        RunSetup.from_dict(record)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_frozen_global_adds_the_same_term_as_the_factors_as_a_peft_adapter(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "nf4", "cpu").eval()
    g = random_adapter(base, r=6, seed=1)  # G: rank-6 factors, applied with scaling 1
    ids = torch.randint(0, 1024, (2, 12))
    plain = logits_of(base, ids)

    beside = attach_lora(base, 4, 8.0, list(TARGETS), seed=0, frozen_global=g)
    via_global = logits_of(beside, ids)  # the trainable LoRA starts with lora_B = 0
    wrapped = [m for m in beside.modules() if hasattr(m, "lora_A") and GLOBAL in m.lora_A]
    grads = {n: p.requires_grad for n, p in beside.named_parameters() if "lora_" in n}
    detach_lora(beside)
    alone = attach_lora(base, 6, 6.0, list(TARGETS), seed=0, init_state=g)
    via_peft = logits_of(alone, ids)
    detach_lora(alone)
    after = logits_of(base, ids)

    assert len(wrapped) == 2 * 2  # two layers, q and v
    assert len(grads) == 2 * 2 * 2 * 2  # 4 modules × 2 adapters × (A, B)
    assert all(grads[n] == (f".{TRAINED}." in n) for n in grads)
    torch.testing.assert_close(via_global, via_peft, rtol=1e-5, atol=1e-5)
    assert (via_global - plain).abs().max() > 1e-3  # G really changes the output
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # every LoRA layer is gone


def test_train_lora_a_false_freezes_lora_a_only(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "nf4", "cpu")
    g = random_adapter(base, r=2, seed=2)

    model = attach_lora(base, 4, 8.0, list(TARGETS), seed=0, frozen_global=g,
                        train_lora_a=False)
    grads = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    detach_lora(model)

    trainable = sorted(n for n, ok in grads.items() if ok)
    assert len(grads) == 16 and len(trainable) == 4
    assert all(f"lora_B.{TRAINED}." in n for n in trainable)


def test_a_round_returns_the_assigned_rank_in_the_wire_dtype(setup, order):
    result = run_round(setup, order, partition_id=1, num_partitions=2, global_state={},
                       device="cpu")

    assert len(result.state) == 2 * 2 * len(TARGETS) and result.kept == {}
    for key, tensor in result.state.items():
        assert tensor.dtype == torch.float16
        assert (tensor.shape[0] if "lora_A" in key else tensor.shape[1]) == 4
    metrics = result.metrics
    assert set(metrics) >= {"num-examples", "train-loss", "train-seconds", "peak-rss-mb",
                            "lora-r", "training-started"}
    assert not set(metrics) & {"loss-before", "prune-ratio"}  # no pruning order: no probes
    assert metrics["lora-r"] == 4.0
    assert 0 < metrics["num-examples"] <= 452 // 2 + 1
    assert metrics["peak-rss-mb"] > 0 and metrics["train-seconds"] > 0


def test_ffa_round_sends_lora_b_only(setup, order):
    ffa = dataclasses.replace(order, train_lora_a=False)

    result = run_round(setup, ffa, 0, 2, {}, device="cpu")

    assert len(result.state) == 2 * len(TARGETS)
    assert all(k.endswith(".lora_B.weight") for k in result.state)


def test_the_cached_base_is_left_untouched_by_a_round(setup, order):
    base = cached_base(setup.model_path, setup.quantization, "cpu")
    before = {n: p.clone() for n, p in base.state_dict().items()}

    run_round(setup, order, 0, 2, {}, device="cpu")

    after = base.state_dict()
    assert before.keys() == after.keys()  # no LoRA layer left behind
    assert not any("lora" in n for n, _ in base.named_modules())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_init_mode_starts_from_the_global_factors(setup, order):
    base = cached_base(setup.model_path, setup.quantization, "cpu")
    init = random_adapter(base, r=4, seed=3)
    still = dataclasses.replace(setup, lr=1e-12, wire_dtype="float32")

    result = run_round(still, dataclasses.replace(order, global_mode="init", local_steps=1),
                       0, 2, init, device="cpu")

    assert result.state.keys() == init.keys()
    for key, tensor in init.items():
        torch.testing.assert_close(result.state[key], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lora-r", 0, "strategy.ranks=0"), ("local-steps", 0, "train.local_steps=0"),
    ("global-mode", "merge", "global-mode='merge'"), ("server-round", 0, "server-round=0"),
])
def test_impossible_orders_are_refused(order, key, value, message):
    record = order.to_config()
    record[key] = value

    with pytest.raises(ValueError, match=message):
        TrainOrder.from_dict(record)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr", -1.0, "train.lr=-1.0"), ("wire-dtype", "int8", "train.wire_dtype='int8'"),
    ("quantization", "int3", "model.quantization='int3'"),
])
def test_impossible_setups_are_refused(setup, key, value, message):
    record = setup.to_config()
    record[key] = value

    with pytest.raises(ValueError, match=message):
        RunSetup.from_dict(record)


def test_fp32_compute_reaches_the_layers_a_round_trains_through(setup, order):
    import bitsandbytes as bnb

    base = cached_base(setup.model_path, setup.quantization, "cpu")
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [layer.compute_dtype for layer in layers]
    try:
        result = run_round(dataclasses.replace(setup, fp32_compute=True), order, 0, 2, {},
                           device="cpu")
        assert layers and {layer.compute_dtype for layer in layers} == {torch.float32}
        assert all(torch.isfinite(t).all() for t in result.state.values())
    finally:  # the cached base is shared with the other tests
        for layer, dtype in zip(layers, before, strict=True):
            layer.compute_dtype = dtype
