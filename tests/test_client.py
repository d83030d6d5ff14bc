"""The client side on a tiny 4-bit model: local rounds, the frozen global term, instructions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedapp.llm.adapters import attach_lora, detach_lora, frozen_delta, lora_state
from fedapp.client.round import run_round
from fedapp.llm.data import DataSpec
from strategies.protocol import TrainInstructions
from fedapp.llm.model import cached_base, load_base

TARGETS = ("q_proj", "v_proj")


@pytest.fixture()
def orders(tiny_model_dir) -> TrainInstructions:
    return TrainInstructions(model_path=str(tiny_model_dir), quantization="nf4",
                             target_modules=TARGETS, lora_r=4, lora_alpha=8.0, local_steps=3,
                             lr=1e-2, batch_size=4, max_length=64, seed=0, partitioner="iid",
                             partitioner_alpha=0.0, data=DataSpec())


def random_adapter(base, r: int, seed: int) -> dict[str, torch.Tensor]:
    model = attach_lora(base, r, float(r), list(TARGETS), seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    state = lora_state(model)
    detach_lora(model)
    return state


def test_instructions_survive_the_config_record(orders):
    record = dataclasses.replace(orders, global_mode="frozen").to_config()

    assert TrainInstructions.from_config(record) == dataclasses.replace(orders,
                                                                         global_mode="frozen")
    del record["lr"]
    with pytest.raises(KeyError, match="lacks 'lr'"):
        TrainInstructions.from_config(record)


def test_frozen_delta_equals_the_same_factors_as_a_peft_adapter(tiny_model_dir):
    base = load_base(str(tiny_model_dir), "nf4", "cpu").eval()
    state = random_adapter(base, r=6, seed=1)
    ids = torch.randint(0, 1024, (2, 12))

    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with frozen_delta(base, state, scaling=1.0) as hooked:
            via_hook = base(input_ids=ids).logits
        peft_model = attach_lora(base, 6, 6.0, list(TARGETS), seed=0, init_state=state)
        via_peft = peft_model(input_ids=ids).logits
        detach_lora(peft_model)
        after = base(input_ids=ids).logits

    assert hooked == 2 * 2  # two layers, q and v
    torch.testing.assert_close(via_hook, via_peft, rtol=1e-4, atol=1e-4)
    assert (via_hook - plain).abs().max() > 1e-3  # the delta really changes the output
    torch.testing.assert_close(after, plain)  # hooks and LoRA layers are gone again


def test_a_round_returns_the_assigned_rank_in_the_wire_dtype(orders):
    state, metrics = run_round(orders, partition_id=1, num_partitions=2, global_state={},
                               device="cpu")

    assert len(state) == 2 * 2 * len(TARGETS)
    for key, tensor in state.items():
        assert tensor.dtype == torch.float16
        assert (tensor.shape[0] if "lora_A" in key else tensor.shape[1]) == 4
    assert set(metrics) >= {"num-examples", "train-loss", "train-seconds", "peak-rss-mb"}
    assert 0 < metrics["num-examples"] <= 452 // 2 + 1
    assert metrics["peak-rss-mb"] > 0 and metrics["train-seconds"] > 0


def test_the_cached_base_is_left_untouched_by_a_round(orders):
    base = cached_base(orders.model_path, orders.quantization, "cpu")
    before = {n: p.clone() for n, p in base.state_dict().items()}

    run_round(orders, 0, 2, {}, device="cpu")

    after = base.state_dict()
    assert before.keys() == after.keys()  # no LoRA layer left behind
    assert not any("lora" in n for n, _ in base.named_modules())


def test_init_mode_starts_from_the_global_factors(orders, tiny_model_dir):
    base = cached_base(orders.model_path, orders.quantization, "cpu")
    init = random_adapter(base, r=4, seed=3)
    still = dataclasses.replace(orders, global_mode="init", lr=1e-12, local_steps=1,
                                wire_dtype="float32")

    state, _ = run_round(still, 0, 2, init, device="cpu")

    for key, tensor in init.items():
        torch.testing.assert_close(state[key], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("change", "message"), [
    ({"lora_r": 0}, "lora-r=0"), ({"lr": -1.0}, "lr=-1.0"), ({"local_steps": 0}, "local-steps=0"),
    ({"global_mode": "merge"}, "global-mode='merge'"), ({"wire_dtype": "int8"}, "wire-dtype"),
])
def test_impossible_orders_are_refused(orders, change, message):
    with pytest.raises(ValueError, match=message):
        run_round(dataclasses.replace(orders, **change), 0, 2, {}, device="cpu")
