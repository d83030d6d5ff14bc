"""FedKSeed: the math against hand-computed values and a step-by-step oracle, and the
strategy through Flower's message API (fake Grid): bytes, aggregation, hostile replies."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies.fedkseed import FedKSeed
from strategies.kseed_math import (
    GRADS,
    SCALARS,
    SEEDS,
    accumulate,
    adapter_state,
    frozen_a,
    perturbation,
    projected_gradient,
    replay,
    seed_probabilities,
    seed_sums,
)
from strategies.lora_math import LORA_A, LORA_B
from strategies.protocol import TrainOrder, ZoOrder
from tests.test_strategies import (  # noqa: F401  (task_identity is an autouse fixture)
    SETUP,
    FakeGrid,
    task_identity,
)

SHAPES = {"m.q_proj": (6, 5), "m.v_proj": (3, 5)}
K, R, SEED, LR = 8, 2, 3, 0.1


def test_seed_sums_and_accumulate_hand_computed():
    sums = seed_sums(torch.tensor([1, 3, 1]), torch.tensor([0.5, -2.0, 1.5]), 4)
    assert sums.tolist() == [0.0, 2.0, 0.0, -2.0]
    # weights 1 and 3: p = 1/4, 3/4
    out = accumulate(torch.tensor([1.0, 0, 0]), [(1.0, torch.tensor([1.0, 0, 2])),
                                                 (3.0, torch.tensor([0.0, 4, 0]))])
    assert out.tolist() == [1.25, 3.0, 0.5]
    with pytest.raises(ValueError, match="positive weight"):
        accumulate(torch.zeros(3), [])


def test_projected_gradient_is_exact_on_a_quadratic():
    # L(x) = |x|^2: (|x + εz|^2 - |x - εz|^2) / 2ε = 2 x·z exactly
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    z, eps = torch.tensor([0.5, 0.75], dtype=torch.float64), 0.1
    value = projected_gradient(float((x + eps * z).pow(2).sum()),
                               float((x - eps * z).pow(2).sum()), eps)
    assert value == pytest.approx(2 * float(x @ z), rel=1e-6)


def test_seed_probabilities_uniform_and_pro_hand_computed():
    assert seed_probabilities(torch.zeros(4), "pro").tolist() == [0.25] * 4  # nothing moved
    assert seed_probabilities(torch.tensor([0.0, 2.0, -4.0]), "uniform").tolist() == \
        pytest.approx([1 / 3] * 3)
    # |C| / max |C| = 0, 0.5, 1 -> softmax
    e = [1.0, math.exp(0.5), math.e]
    assert seed_probabilities(torch.tensor([0.0, 2.0, -4.0]), "pro").tolist() == \
        pytest.approx([v / sum(e) for v in e])
    with pytest.raises(ValueError, match="strategy.sampling='x'; allowed"):
        seed_probabilities(torch.zeros(2), "x")


def test_perturbations_and_a_are_the_same_in_every_process_and_differ_by_seed():
    z1, z1_again, z2 = (perturbation(SHAPES, R, SEED, i) for i in (1, 1, 2))
    assert {m: t.shape for m, t in z1.items()} == {"m.q_proj": (6, R), "m.v_proj": (3, R)}
    assert all(torch.equal(z1[m], z1_again[m]) for m in SHAPES)
    assert not torch.equal(z1["m.q_proj"], z2["m.q_proj"])
    a = frozen_a(SHAPES, R, SEED)
    assert a["m.q_proj"].shape == (R, 5) and torch.equal(a["m.v_proj"],
                                                         frozen_a(SHAPES, R, SEED)["m.v_proj"])


def test_replaying_the_scalars_gives_the_state_the_steps_reached():
    """Oracle: apply the steps one by one (B -= lr g z_i); replaying the summed scalars
    must land on the same B, and the clients' weighted average must equal the replay of
    the accumulated scalars (FedAvg of states is exact)."""
    def walk(steps):
        b = {m: torch.zeros(out, R, dtype=torch.float64) for m, (out, _) in SHAPES.items()}
        for i, g in steps:
            for m, z in perturbation(SHAPES, R, SEED, i).items():
                b[m] -= LR * g * z.double()
        return b

    client1, client2 = [(0, 0.5), (3, -1.0), (0, 2.0)], [(5, 1.5), (3, 0.25)]
    sums = [seed_sums(torch.tensor([i for i, _ in s]), torch.tensor([g for _, g in s]), K)
            for s in (client1, client2)]
    for steps, c in zip((client1, client2), sums):
        got = replay(SHAPES, R, SEED, c, LR)
        for m, b in walk(steps).items():
            torch.testing.assert_close(got[m].double(), b, rtol=1e-6, atol=1e-6)
    scalars = accumulate(torch.zeros(K), [(10.0, sums[0]), (30.0, sums[1])])
    averaged = {m: 0.25 * walk(client1)[m] + 0.75 * walk(client2)[m] for m in SHAPES}
    state = adapter_state(SHAPES, R, SEED, scalars, LR)
    for m in SHAPES:
        torch.testing.assert_close(state[m + LORA_B].double(), averaged[m], rtol=1e-6,
                                   atol=1e-6)
        assert torch.equal(state[m + LORA_A], frozen_a(SHAPES, R, SEED)[m])


def test_a_zero_order_order_is_checked_where_it_is_made():
    zo = ZoOrder(seeds=4, eps=1e-3, lr=1e-4, sampling="pro", run_seed=0)
    order = TrainOrder(server_round=1, lora_r=2, lora_alpha=4.0, local_steps=3, seed=0,
                       train_lora_a=False, zo=zo)
    assert TrainOrder.from_dict(order.to_dict()) == order  # round trip over the wire
    with pytest.raises(ValueError, match="strategy.seeds=0; allowed: an int >= 1"):
        ZoOrder(seeds=0, eps=1e-3, lr=1e-4, sampling="uniform", run_seed=0)
    with pytest.raises(ValueError, match="zeroth-order orders train lora_B only"):
        TrainOrder(server_round=1, lora_r=2, lora_alpha=4.0, local_steps=3, seed=0, zo=zo)


# ---------------------------------------------------------------------- the strategy
def kseed(**kwargs) -> FedKSeed:
    return FedKSeed(SETUP, SHAPES, local_steps=3, ranks=[R], alpha_ratio=2.0,
                    min_available_nodes=2, seeds=K, seed=SEED, zo_lr=LR, **kwargs)


def pairs_reply(msg: Message, indices, grads, n: float = 10.0, index_dtype=torch.int32
                ) -> Message:
    arrays = ArrayRecord({SEEDS: torch.tensor(indices, dtype=index_dtype),
                          GRADS: torch.tensor(grads, dtype=torch.float32)})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": n, "train-loss": 1.0})}), reply_to=msg)


def test_fedkseed_sends_k_scalars_accumulates_pairs_and_rejects_bad_indices():
    strategy = kseed()
    grid = FakeGrid({11: 0, 12: 1, 13: 2})
    strategy.min_available_nodes = 3
    msgs = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}
    for m in msgs.values():
        scalars = m.content["arrays"].to_torch_state_dict()[SCALARS]
        assert scalars.dtype == torch.float64 and scalars.shape == (K,) and not scalars.any()
        order = TrainOrder.from_dict(m.content["config"])
        assert order.zo.seeds == K and not order.train_lora_a
    arrays, metrics = strategy.aggregate_train(1, [
        pairs_reply(msgs[11], [1, 1, 4], [0.5, 0.5, -1.0], n=10.0),
        pairs_reply(msgs[12], [2, 2, 2], [1.0, 1.0, 1.0], n=30.0),
        pairs_reply(msgs[13], [0, 8, 1], [1.0, 1.0, 1.0])])  # 8 is out of range

    assert "seed index 8 out of range; allowed: 0..7" in \
        strategy.round_log[1].clients["partition-2"].status
    scalars = arrays.to_torch_state_dict()[SCALARS]
    assert scalars.tolist() == [0.0, 0.25, 2.25, 0.0, -0.25, 0.0, 0.0, 0.0]
    assert metrics["seeds-touched"] == 3.0
    assert strategy.round_log[1].bytes_up < 1024  # a few hundred bytes per client
    state, r, alpha = strategy.global_adapter(arrays)
    assert (r, alpha) == (R, 2.0 * R)
    expected = replay(SHAPES, R, SEED, scalars, LR)
    assert all(torch.equal(state[m + LORA_B], expected[m]) for m in SHAPES)
    round2 = strategy.configure_train(2, arrays, ConfigRecord(), grid)
    assert all(torch.equal(m.content["arrays"].to_torch_state_dict()[SCALARS], scalars)
               for m in round2)


@pytest.mark.parametrize("indices, grads, reason", [
    ([0, 1], [1.0, 1.0], "shape"),  # fewer pairs than steps
    ([0, 1, 2], [1.0, float("nan"), 1.0], "NaN or Inf"),
    ([0, -1, 2], [1.0, 1.0, 1.0], "seed index -1 out of range")])
def test_fedkseed_rejects_malformed_pairs_without_touching_the_scalars(indices, grads, reason):
    strategy = kseed()
    grid = FakeGrid({11: 0, 12: 1})
    msgs = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}
    arrays, _ = strategy.aggregate_train(1, [pairs_reply(msgs[11], indices, grads),
                                             pairs_reply(msgs[12], [3, 3, 3], [1.0, 1.0, 1.0])])
    assert reason in strategy.round_log[1].clients["partition-0"].status
    assert arrays.to_torch_state_dict()[SCALARS].tolist() == [0, 0, 0, 3.0, 0, 0, 0, 0]


def test_fedkseed_refuses_bad_configuration():
    with pytest.raises(ValueError, match="a single rank"):
        FedKSeed(SETUP, SHAPES, local_steps=3, ranks=[2, 4], alpha_ratio=2.0)
    with pytest.raises(ValueError, match="strategy.seeds=0"):
        FedKSeed(SETUP, SHAPES, local_steps=3, ranks=[R], alpha_ratio=2.0, seeds=0)


# ---------------------------------------------------------------------- the client, 4-bit
def test_a_client_round_uploads_pairs_whose_replay_is_where_its_steps_went(tiny_model_dir):
    """On the real 4-bit path: the client's B after its zeroth-order steps equals the
    replay of (the scalars it started from + its uploaded pairs summed per seed)."""
    from fedapp.client.zeroth import lora_b_parameters, zo_round, zo_steps
    from fedapp.llm.adapters import target_module_shapes, with_lora
    from fedapp.llm.model import cached_base
    from strategies.protocol import RunSetup

    setup = RunSetup(model_path=str(tiny_model_dir), quantization="nf4",
                     target_modules=("q_proj", "v_proj"), lr=1e-2, batch_size=4, max_length=64,
                     partitioner="iid", partitioner_alpha=0.0)
    base = cached_base(setup.model_path, "nf4", "cpu")
    shapes = target_module_shapes(base, ["q_proj", "v_proj"])
    start = torch.zeros(K, dtype=torch.float64)
    start[2] = 0.5  # the client starts from a moved state: the replay matters
    zo = ZoOrder(seeds=K, eps=1e-2, lr=LR, sampling="pro", run_seed=SEED)
    order = TrainOrder(server_round=1, lora_r=R, lora_alpha=2.0 * R, local_steps=4, seed=5,
                       train_lora_a=False, zo=zo)
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 1000, (2, 16), generator=gen),
             "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    with with_lora(base, R, 2.0 * R, ["q_proj", "v_proj"], 0,
                   init_state=adapter_state(shapes, R, SEED, start, LR),
                   train_lora_a=False) as model:
        model.eval()
        params = lora_b_parameters(model, sorted(shapes))
        indices, grads, losses = zo_steps(model, params, iter([batch] * 4), order, shapes,
                                          seed_probabilities(start, "pro"),
                                          torch.Generator().manual_seed(1), "chunked")
        reached = {m: p.detach().clone() for m, p in params.items()}

    assert len(indices) == len(grads) == len(losses) == 4 and any(g != 0 for g in grads)
    expected = replay(shapes, R, SEED, start + seed_sums(torch.tensor(indices),
                                                          torch.tensor(grads), K), LR)
    for m in shapes:
        torch.testing.assert_close(reached[m], expected[m], rtol=1e-5, atol=1e-6)

    result = zo_round(setup, order, 0, 2, {SCALARS: start}, device="cpu")
    assert set(result.state) == {SEEDS, GRADS} and result.state[SEEDS].shape == (4,)
    assert result.state[SEEDS].dtype == torch.int32 and result.metrics["num-examples"] > 0
    with pytest.raises(ValueError, match=r"'kseed.scalars' is \(3,\); expected \(8,\)"):
        zo_round(setup, order, 0, 2, {SCALARS: torch.zeros(3)}, device="cpu")
