"""FedBiOT: the emulator math against hand-computed values, the emulator a device loads
(only its layers read, equal to the full model with the others skipped), the server's
alignment on public data, the strategy through Flower's message API (fake Grid) and a real
4-bit client round on the emulator."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from strategies.base import ClientIdentity
from strategies.biot_math import (
    distill_loss,
    emulator_layers,
    fold_scaling,
    frozen_adapter,
    layer_scores,
)
from strategies.fedbiot import FedBiOT
from strategies.lora_math import LORA_A, LORA_B, join_factors, split_factors
from strategies.protocol import RunSetup, TrainOrder
from tests.test_strategies import (  # noqa: F401  (task_identity is an autouse fixture)
    SETUP,
    FakeGrid,
    reply,
    task_identity,
)
from tests.tiny import build_tiny_model

# four layers, q (out 6) and v (out 3), in 5
SHAPES = {f"m.layers.{i}.attn.{p}": (o, 5) for i in range(4) for p, o in (("q", 6), ("v", 3))}


def test_layer_scores_and_the_emulator_layers_hand_computed():
    # Prepare: block scores of 6 layers (attention + MLP each)
    blocks = {(0, "self_attn"): 0.05, (0, "mlp"): 0.05, (1, "self_attn"): 0.2, (1, "mlp"): 0.3,
              (2, "mlp"): 0.3, (3, "self_attn"): 0.2, (4, "mlp"): 0.9, (5, "mlp"): 0.4}

    # Execute
    scores = layer_scores(blocks, 6)

    # Assert: sums per layer; the 2 highest of the 4 layers below a 2-layer adapter (1 and
    # 2 at 0.5 and 0.3), then the adapter; a tie goes to the lower layer
    assert scores == pytest.approx([0.1, 0.5, 0.3, 0.2, 0.9, 0.4])
    assert emulator_layers(scores, 2, 2) == (1, 2, 4, 5)
    assert emulator_layers([0.2, 0.1, 0.2, 0.0], 1, 1) == (0, 3)
    assert emulator_layers(scores, 1, 5) == (0, 1, 2, 3, 4, 5)


@pytest.mark.parametrize(("adapter", "keep", "message"), [
    (2, 0, (r"strategy.emulator_layers=0: an emulator must keep at least one of the 4 "
            r"layers below the adapter; allowed: 1..4")),
    (2, 5, r"strategy.emulator_layers=5.*allowed: 1..4"),
    (0, 1, r"strategy.adapter_layers=0; allowed: 1..5"),
    (6, 1, r"strategy.adapter_layers=6; allowed: 1..5"),
])
def test_the_emulator_split_refuses_what_cannot_be_built(adapter, keep, message):
    with pytest.raises(ValueError, match=message):
        emulator_layers([0.0] * 6, adapter, keep)


def test_the_frozen_adapter_is_e_beside_g_each_module_at_its_rank():
    # Prepare: E of rank 2 on one module, G of rank 3 on another
    gen = torch.Generator().manual_seed(0)
    e = {"e": (torch.randn(2, 5, generator=gen), torch.randn(4, 2, generator=gen))}
    g = {"g": (torch.randn(3, 5, generator=gen), torch.randn(6, 3, generator=gen))}

    # Execute
    both = frozen_adapter(e, g)

    # Assert: both modules, untouched (no padding: E is sent at its own rank)
    assert both == {**e, **g}
    assert frozen_adapter({}, {}) == {}
    with pytest.raises(ValueError, match="overlap"):
        frozen_adapter(e, e)
    a, b = fold_scaling(e, 2.0)["e"]
    assert torch.equal(a, 2.0 * e["e"][0]) and torch.equal(b, e["e"][1])


def test_distill_loss_hand_computed():
    # Prepare: two positions over a 2-token vocabulary; at the first the teacher is uniform
    # and the student puts 3/4 on token 0, at the second both agree
    teacher = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    student = torch.tensor([[[math.log(3.0), 0.0], [1.0, 2.0]]])

    # Execute / Assert: KL(t ‖ s) at the first = ½ ln(½ / ¾) + ½ ln(½ / ¼) = ½ ln(4/3);
    # averaged with the second's 0; the first alone when the mask keeps it alone
    first = 0.5 * math.log(4 / 3)
    assert float(distill_loss(student, teacher)) == pytest.approx(first / 2)
    assert float(distill_loss(student, teacher, torch.tensor([[1, 0]]))) == pytest.approx(first)
    assert float(distill_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)


def biot(**kwargs) -> FedBiOT:
    return FedBiOT(SETUP, SHAPES, local_steps=2, alpha_ratio=2.0, min_available_nodes=2,
                   adapter_layers=1, emulator_layers=2, rank=4, **kwargs)


def test_fedbiot_orders_the_emulator_sends_e_and_g_and_stacks_the_adapter():
    # Prepare: layers 0 and 2 kept below the 1-layer adapter (3); E on layer 0's q only
    strategy = biot()
    gen = torch.Generator().manual_seed(1)
    e = {"m.layers.0.attn.q": (torch.randn(2, 5, generator=gen), torch.randn(6, 2, generator=gen))}
    with pytest.raises(RuntimeError, match="never prepared"):
        strategy.order_for(1, ClientIdentity("partition-0", 0))
    strategy.set_emulator((0, 2, 3), e, {"align-kl-after": 0.1})
    grid = FakeGrid({11: 0, 12: 1})

    # Execute: round 1
    msgs = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}

    # Assert: ranks over the emulator's 6 modules (layer 3's q and v at 4), E sent alone
    order = TrainOrder.from_dict(msgs[11].content["config"])
    assert order.pipe.layers == (0, 2, 3) and order.pipe.ranks == (0, 0, 0, 0, 4, 4)
    sent = split_factors(msgs[11].content["arrays"].to_torch_state_dict())
    assert set(sent) == {"m.layers.0.attn.q"}
    torch.testing.assert_close(sent["m.layers.0.attn.q"][1].float()
                               @ sent["m.layers.0.attn.q"][0].float(),
                               e["m.layers.0.attn.q"][1] @ e["m.layers.0.attn.q"][0],
                               rtol=2e-3, atol=2e-3)

    # Execute: two replies on layer 3, one carrying a module outside the adapter
    def upload(extra: bool) -> dict:
        state = {}
        for p, out in (("q", 6), ("v", 3)):
            state[f"m.layers.3.attn.{p}{LORA_A}"] = torch.randn(4, 5, generator=gen)
            state[f"m.layers.3.attn.{p}{LORA_B}"] = torch.randn(out, 4, generator=gen)
        if extra:
            state["m.layers.2.attn.q" + LORA_A] = torch.randn(4, 5, generator=gen)
            state["m.layers.2.attn.q" + LORA_B] = torch.randn(6, 4, generator=gen)
        return state

    good = upload(False)
    arrays, _ = strategy.aggregate_train(1, [reply(msgs[11], good, 10.0),
                                             reply(msgs[12], upload(True), 10.0)])

    # Assert: the stray reply is rejected, G is the good client's s·B·A on layer 3, and
    # round 2 sends E and G padded to one rank
    assert strategy.round_log[1].clients["partition-1"].status != "ok"
    g = split_factors(arrays.to_torch_state_dict())
    assert set(g) == {"m.layers.3.attn.q", "m.layers.3.attn.v"}  # the adapter only
    want = 2.0 * good["m.layers.3.attn.q" + LORA_B] @ good["m.layers.3.attn.q" + LORA_A]
    torch.testing.assert_close(g["m.layers.3.attn.q"][1] @ g["m.layers.3.attn.q"][0], want,
                               rtol=1e-5, atol=1e-5)
    msgs = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(2, arrays, ConfigRecord(), grid)}
    sent = split_factors(msgs[11].content["arrays"].to_torch_state_dict())
    assert {m: a.shape[0] for m, (a, _) in sent.items()} == {
        "m.layers.0.attn.q": 2, "m.layers.3.attn.q": 4, "m.layers.3.attn.v": 4}

    # a resumed strategy gets the same emulator back
    again = biot()
    again.load_state(strategy.state_dict(), arrays)
    assert again.emulator == (0, 2, 3) and again.align_figures == {"align-kl-after": 0.1}


def test_fedbiot_refuses_a_split_the_model_cannot_hold():
    with pytest.raises(ValueError, match="strategy.emulator_layers=4.*allowed: 1..3"):
        FedBiOT(SETUP, SHAPES, local_steps=2, alpha_ratio=2.0, adapter_layers=1,
                emulator_layers=4, rank=4)
    with pytest.raises(ValueError, match=r"strategy.rank=\[8\]: rank 8 exceeds 5"):
        FedBiOT(SETUP, SHAPES, local_steps=2, alpha_ratio=2.0, adapter_layers=1,
                emulator_layers=1, rank=8)
    with pytest.raises(ValueError, match="zero layers kept"):
        FedBiOT(SETUP, SHAPES, local_steps=2, alpha_ratio=2.0, emulator_layers=0)
    with pytest.raises(ValueError, match="strategy.align_lr=0; allowed: a number > 0"):
        FedBiOT(SETUP, SHAPES, local_steps=2, alpha_ratio=2.0, emulator_layers=1,
                adapter_layers=1, rank=4, align_lr=0)


@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory) -> str:
    """A tiny Llama of 5 layers."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-deep"), layers=5))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_the_device_emulator_reads_only_its_layers_and_equals_the_skipped_full_model(
        family, tmp_path, monkeypatch):
    from safetensors import safe_open

    from fedapp.llm.emulator import emulated, emulator_folder, load_emulator
    from fedapp.llm.model import load_base

    # Prepare
    monkeypatch.setenv("FEDAPP_CACHE", str(tmp_path))
    deep_tiny = str(build_tiny_model(tmp_path / family, family=family, layers=5))
    layers = (1, 3, 4)  # gemma3: sliding, sliding, full attention; 40 tokens > its window
    x = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))

    # Execute
    folder = emulator_folder(deep_tiny, layers)
    emulator = load_emulator(deep_tiny, "nf4", "cpu", layers)
    base = load_base(deep_tiny, "nf4", "cpu")
    with torch.no_grad():
        with emulated(base, layers):
            want = base(input_ids=x).logits
        full = base(input_ids=x).logits
        got = emulator(input_ids=x).logits

    # Assert: the cut checkpoint holds layers 0..2 (renumbered) only; the emulator is the
    # full model with layers 0 and 2 skipped, exactly, and differs from the full model
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        indices = {int(k.split(".")[2]) for k in handle.keys()  # noqa: SIM118
                   if k.startswith("model.layers.")}
    assert indices == {0, 1, 2}
    meta = json.loads((folder / "emulator.json").read_text())
    assert (meta["layers"], meta["num_layers"]) == ([1, 3, 4], 5)
    assert torch.equal(got, want) and not torch.allclose(full, want)
    names = [n for n, _ in emulator.named_modules() if n.endswith("q_proj")]
    assert names == [f"model.layers.{i}.self_attn.q_proj" for i in layers]


def test_the_server_aligns_the_emulator_on_public_data_and_a_client_trains_the_adapter(
        deep_tiny, tmp_path, monkeypatch):
    from fedapp.client.round import run_round
    from fedapp.llm.adapters import target_module_shapes
    from fedapp.llm.model import cached_tokenizer, load_base
    from fedapp.server.emulator import prepare_emulator

    # Prepare: the strategy over the tiny model's q/v modules, 1 adapter layer, 2 kept
    monkeypatch.setenv("FEDAPP_CACHE", str(tmp_path))
    base = load_base(deep_tiny, "nf4", "cpu")
    shapes = target_module_shapes(base, ["q_proj", "v_proj"])
    setup = RunSetup(model_path=deep_tiny, quantization="nf4", target_modules=("q_proj", "v_proj"),
                     lr=1e-2, batch_size=2, max_length=32, partitioner="iid", partitioner_alpha=0.0)
    strategy = FedBiOT(setup, shapes, local_steps=2, alpha_ratio=2.0, adapter_layers=1,
                       emulator_layers=2, rank=4, emulator_rank=2, align_steps=15,
                       align_lr=1e-2, public_examples=8)

    # Execute
    prepare_emulator(strategy, base, cached_tokenizer(deep_tiny), 32, 2, ["q_proj", "v_proj"])

    # Assert: two of layers 0..3 kept plus layer 4; E on the kept bottom layers only, and
    # the alignment lowered the held-out KL(full ‖ emulator)
    kept = strategy.emulator
    assert len(kept) == 3 and kept[-1] == 4 and all(i < 4 for i in kept[:2])
    assert {int(m.split(".layers.")[1].split(".")[0]) for m in strategy.emulator_factors} \
        == set(kept[:2])
    figures = strategy.align_figures
    assert figures["align-kl-after"] < figures["align-kl-before"]

    # Execute: a device's round with the order and the arrays the strategy sends
    client = ClientIdentity("partition-0", 0)
    order = strategy.order_for(1, client)
    arrays = strategy.client_arrays(client, {}).to_torch_state_dict()
    result = run_round(setup, order, 0, 2, arrays, device="cpu")

    # Assert: the reply holds layer 4's q and v at rank 4, trained
    got = {m: a.shape[0] for m, (a, _) in split_factors(result.state).items()}
    assert got == {k: 4 for k in shapes if ".layers.4." in k}
    assert any(b.any() for _, b in split_factors(result.state).values())
    assert join_factors(split_factors(result.state)).keys() == result.state.keys()


def test_a_frozen_adapter_of_mixed_ranks_keeps_each_module_at_its_rank_and_scaling_one(
        tiny_model_dir):
    from fedapp.llm.adapters import target_module_shapes, with_lora
    from fedapp.llm.model import cached_base

    # Prepare: E-like rank 2 on the first q_proj, G-like rank 3 on the last v_proj
    base = cached_base(str(tiny_model_dir), "nf4", "cpu")
    shapes = target_module_shapes(base, ["q_proj", "v_proj"])
    first, last = min(shapes), max(shapes)
    gen = torch.Generator().manual_seed(4)
    frozen = {}
    for module, r in ((first, 2), (last, 3)):
        out_f, in_f = shapes[module]
        frozen[module + LORA_A] = torch.randn(r, in_f, generator=gen)
        frozen[module + LORA_B] = torch.randn(out_f, r, generator=gen)

    # Execute
    with with_lora(base, 4, 8.0, ["q_proj", "v_proj"], 0, frozen_global=frozen) as model:
        wrapped = {n: (m.r["global"], m.scaling["global"]) for n, m in model.named_modules()
                   if isinstance(getattr(m, "r", None), dict) and "global" in m.r}
        loaded = {n: m.lora_B["global"].weight.detach().clone() for n, m in
                  model.named_modules() if n in wrapped}

    # Assert: exactly those two modules, each at its rank with scaling 1, B as sent
    short = {n.split("base_model.model.")[-1]: v for n, v in wrapped.items()}
    assert short == {first.split("base_model.model.")[-1]: (2, 1.0),
                     last.split("base_model.model.")[-1]: (3, 1.0)}
    for name, weight in loaded.items():
        key = next(m for m in (first, last) if name.endswith(m.split("base_model.model.")[-1]))
        assert torch.equal(weight, frozen[key + LORA_B].to(weight.dtype))
