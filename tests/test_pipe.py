"""FedPipe: the structure math against hand-computed values, the per-module aggregation
against a dense oracle, the strategy through Flower's message API (fake Grid), and a real
4-bit client round that trains exactly the ordered structure."""

from __future__ import annotations

import math
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from strategies.devices import DeviceProfile
from strategies.fedpipe import FedPipe
from strategies.global_version import GlobalVersion
from strategies.lora_math import LORA_A, LORA_B, LoraUpdate, split_factors
from strategies.pipe_math import (
    estimate,
    lora_parameters,
    module_layers,
    pipe_costs,
    ranks_from_importance,
    stack_per_module,
    update_importance,
    window,
    window_depth,
)
from strategies.protocol import GLOBAL, PipeOrder, TrainOrder
from tests.test_strategies import (  # noqa: F401  (task_identity is an autouse fixture)
    SETUP,
    FakeGrid,
    reply,
    task_identity,
)

# three layers, q (out 6) and v (out 3), in 5: q+v of one layer at rank r cost 19 r params
SHAPES = {f"m.layers.{i}.attn.{p}": (o, 5) for i in range(3) for p, o in (("q", 6), ("v", 3))}
BIG = {f"m.layers.{i}.attn.{p}": (o, 200) for i in range(3) for p, o in (("q", 240), ("v", 120))}
COSTS = {"fixed_mb": 100.0, "layer_mb": 10.0, "lora_mb_per_mparam": 1e5,
         "forward_s": 1.0, "backward_s": 3.0}  # 0.1 MB per LoRA parameter


def test_layers_windows_and_costs_hand_computed():
    layers = module_layers(SHAPES)
    assert layers["m.layers.2.attn.q"] == 2 and layers["m.layers.0.attn.v"] == 0
    assert window(layers, 1) == ["m.layers.2.attn.q", "m.layers.2.attn.v"]
    assert lora_parameters(SHAPES, {"m.layers.2.attn.q": 4, "m.layers.2.attn.v": 2}) == \
        4 * 11 + 2 * 8
    # depth 2 at rank 4: 100 + 10·2 + 0.1·(2 layers · 19 · 4) = 135.2 MB; (1 + 3·2/3)·2 = 6 s
    assert estimate(COSTS, 2, 3, 2 * 19 * 4, slowdown=2.0) == pytest.approx((135.2, 6.0))
    # memory: depth 3 needs 152.8, depth 2 135.2 -> a 140 MB budget gets 2 layers
    assert window_depth(SHAPES, layers, 4, COSTS, 140.0, 1.0, None) == 2
    # time: depth d takes (1 + d) s at slowdown 1, ×2 on a slower device; budget 3.5 s
    assert window_depth(SHAPES, layers, 4, COSTS, 1e9, 1.0, 3.5) == 2
    assert window_depth(SHAPES, layers, 4, COSTS, 1e9, 2.0, 3.5) == 0  # 4 s at one layer
    with pytest.raises(ValueError, match=r"is in no '.layers.<i>.' block"):
        module_layers({"lm_head": (5, 5)})
    with pytest.raises(ValueError, match="strategy.costs="):
        pipe_costs({**COSTS, "forward_s": -1.0})


def test_ranks_follow_importance_shares():
    ranks = ranks_from_importance({"a": 10.0, "b": 5.0, "c": 3.0, "d": 2.0, "e": 0.5},
                                  [4, 8, 16], 0.25)
    # shares 1, 0.5, 0.3, 0.2, 0.05 of 16 -> 16, 8, 4.8 -> 4, below min share, below
    assert ranks == {"a": 16, "b": 8, "c": 4, "d": 0, "e": 0}
    assert ranks_from_importance({"a": 1.0, "b": 1.0}, [4, 8], 0.25) == {"a": 8, "b": 8}
    assert ranks_from_importance({"a": 0.0, "b": 0.0}, [4, 8], 0.25) == {"a": 8, "b": 8}


def test_update_importance_is_the_frobenius_norm_of_the_scaled_product():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=gen), torch.randn(6, 3, generator=gen)
    update = LoraUpdate({"m": (a, b)}, scaling=2.0, weight=1.0)
    assert update_importance(update)["m"] == pytest.approx(float((2.0 * b.double() @ a.double()).norm()),
                                                           rel=1e-9)


def test_per_module_stacking_equals_the_renormalised_dense_average():
    gen = torch.Generator().manual_seed(1)
    q, v = "m.layers.2.attn.q", "m.layers.2.attn.v"
    shapes = {q: (6, 5), v: (3, 5), "m.layers.0.attn.q": (6, 5)}

    def factors(module, r):
        return torch.randn(r, 5, generator=gen), torch.randn(shapes[module][0], r, generator=gen)

    one = LoraUpdate({q: factors(q, 2), v: factors(v, 4)}, scaling=2.0, weight=1.0)
    two = LoraUpdate({q: factors(q, 3)}, scaling=2.0, weight=3.0)
    delta = stack_per_module([one, two], shapes)

    dense = {m: b.double() @ a.double() for m, (a, b) in delta.items()}
    expected_q = sum(w * 2.0 * (u.factors[q][1] @ u.factors[q][0]).double()
                     for w, u in ((0.25, one), (0.75, two)))
    torch.testing.assert_close(dense[q], expected_q)
    # only client one trained v: its weight renormalises to 1, not 1/4
    torch.testing.assert_close(dense[v], 2.0 * (one.factors[v][1] @ one.factors[v][0]).double())
    assert not dense["m.layers.0.attn.q"].any()  # nobody trained it
    assert {a.shape[0] for a, _ in delta.values()} == {5}  # padded to the largest, 2 + 3


def pipe(devices=None, **kwargs) -> FedPipe:
    return FedPipe(SETUP, SHAPES, local_steps=2, alpha_ratio=2.0, min_available_nodes=2,
                   rank_grid=[2, 4], costs=COSTS, devices=devices, **kwargs)


def structured(order: TrainOrder, gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for module, r in zip(sorted(SHAPES), order.pipe.ranks, strict=True):
        if r:
            state[module + LORA_A] = torch.randn(r, 5, generator=gen)
            state[module + LORA_B] = torch.randn(SHAPES[module][0], r, generator=gen)
    return state


def test_fedpipe_windows_by_budget_measures_importance_and_checks_structures():
    devices = [DeviceProfile("phone", slowdown=2.0), DeviceProfile("edge")]
    strategy = pipe(devices, step_seconds=7.0)  # phone: (1 + d)·2 <= 7 -> 2 layers; edge 3
    assert strategy.depths == {"phone": 2, "edge": 3}
    grid = FakeGrid({11: 0, 12: 1})
    msgs = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}
    orders = {n: TrainOrder.from_dict(m.content["config"]) for n, m in msgs.items()}
    keys = sorted(SHAPES)  # layer 0's modules first
    assert orders[11].pipe.ranks == (0, 0, 4, 4, 4, 4) and orders[11].lora_r == 4
    assert orders[12].pipe.ranks == (4,) * 6

    gen = torch.Generator().manual_seed(2)
    phone = structured(orders[11], gen)
    phone[keys[2] + LORA_B] = phone[keys[2] + LORA_B] * 100  # layer 1's q matters most
    bad = structured(orders[12], gen)
    bad.pop(keys[0] + LORA_A)  # a module missing: rejected, the round goes on
    arrays, _ = strategy.aggregate_train(1, [reply(msgs[11], phone, 10.0),
                                             reply(msgs[12], bad, 10.0)])
    assert "missing" in strategy.round_log[1].clients["partition-1"].status
    assert set(strategy.importance) == {"partition-0"}
    g = split_factors(arrays.to_torch_state_dict())  # held at wire precision (fp16)
    expected = 2.0 * phone[keys[2] + LORA_B] @ phone[keys[2] + LORA_A]
    got = g[keys[2]][1].float() @ g[keys[2]][0].float()
    assert float((got - expected).norm() / expected.norm()) < 2e-3

    msgs = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(2, arrays, ConfigRecord(), grid)}
    ranks = TrainOrder.from_dict(msgs[11].content["config"]).pipe.ranks
    assert ranks[2] == 4 and ranks[:2] == (0, 0) and sum(r > 0 for r in ranks) < 4
    sent = msgs[11].content["arrays"].to_torch_state_dict()
    assert not any(k.startswith(keys[0]) for k in sent)  # layer 0 is all zeros: not sent


def test_fedpipe_refuses_a_budget_no_structure_fits_and_bad_keys():
    with pytest.raises(ValueError, match=r"scenario.devices.phone .* fits no FedPipe "
                                         r"structure: even the top layer at rank 4 needs"):
        pipe([DeviceProfile("phone", memory_mb=110.0)])
    with pytest.raises(ValueError, match="strategy.rank_grid=\\[\\]"):
        FedPipe(SETUP, SHAPES, local_steps=2, alpha_ratio=2.0, rank_grid=[])
    with pytest.raises(ValueError, match="strategy.step_seconds=0"):
        pipe(step_seconds=0)
    with pytest.raises(ValueError, match="strategy.min_share=2"):
        pipe(min_share=2)
    with pytest.raises(ValueError, match="one rank >= 0 per target module"):
        PipeOrder(ranks=(0, 0))
    with pytest.raises(ValueError, match=r"pipe-ranks=\(0, 0\)"):
        PipeOrder(ranks=(0, 0))
    with pytest.raises(ValueError, match="dp.enabled=true"):
        pipe(dp={"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5})
    with pytest.raises(ValueError, match="largest rank is lora_r"):
        TrainOrder(server_round=1, lora_r=8, lora_alpha=16.0, local_steps=1, seed=0,
                   pipe=PipeOrder(ranks=(4, 0)))


def test_a_client_trains_exactly_the_ordered_structure(tiny_model_dir):
    """On the real 4-bit path: only the ordered modules get LoRA, each at its rank, and
    the reply holds those factors, trained."""
    from fedapp.client.round import run_round
    from fedapp.llm.adapters import target_module_shapes, with_lora
    from fedapp.llm.model import cached_base
    from strategies.protocol import RunSetup

    setup = RunSetup(model_path=str(tiny_model_dir), quantization="nf4",
                     target_modules=("q_proj", "v_proj"), lr=1e-2, batch_size=2,
                     max_length=64, partitioner="iid", partitioner_alpha=0.0)
    shapes = target_module_shapes(cached_base(setup.model_path, "nf4", "cpu"),
                                  ["q_proj", "v_proj"])
    keys = sorted(shapes)
    ranks = [0] * len(keys)
    ranks[-1], ranks[-2] = 4, 2  # the last layer in key order: its q_proj and v_proj
    order = TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=2, seed=0,
                       pipe=PipeOrder(ranks=tuple(ranks)))
    result = run_round(setup, order, 0, 2, {}, device="cpu")
    got = {m: a.shape[0] for m, (a, _) in split_factors(result.state).items()}
    assert got == {keys[-2]: 2, keys[-1]: 4}
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.metrics["lora-params"] == sum(v.numel() for v in result.state.values())
    assert any(b.any() for m, (_, b) in split_factors(result.state).items())

    # every module at scaling alpha_ratio (lora_alpha / r = 2), beside a frozen global that
    # covers one module only (the others add nothing): the server reads order.scaling
    base = cached_base(setup.model_path, "nf4", "cpu")
    gen = torch.Generator().manual_seed(3)
    out_f, in_f = shapes[keys[0]]
    partial = {keys[0] + LORA_A: torch.randn(3, in_f, generator=gen),
               keys[0] + LORA_B: torch.randn(out_f, 3, generator=gen)}
    with with_lora(base, 4, 8.0, ["q_proj", "v_proj"], 0, frozen_global=partial,
                   ranks={keys[-2]: 2, keys[-1]: 4}) as model:
        trained = {n: m for n, m in model.named_modules()
                   if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
        assert {n: (m.r["default"], m.scaling["default"]) for n, m in trained.items()} == {
            keys[-2]: (2, 2.0), keys[-1]: (4, 2.0)}
        nonzero = [n for n, m in model.named_modules()
                   if isinstance(getattr(m, "lora_B", None), torch.nn.ModuleDict)
                   and "global" in m.lora_B and m.lora_B["global"].weight.any()]
        assert nonzero == [keys[0]]
    order = TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=1, seed=0,
                       global_mode="frozen", pipe=PipeOrder(ranks=tuple(ranks)))
    beside = run_round(setup, order, 0, 2, partial, device="cpu")
    assert set(split_factors(beside.state)) == {keys[-2], keys[-1]}
    with pytest.raises(ValueError, match="lists 2 module ranks"):
        run_round(setup, TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=1,
                                    seed=0, pipe=PipeOrder(ranks=(4, 0))), 0, 2, {},
                  device="cpu")


class PipeFederation:
    """A FedPipe server and the real ClientApp handler per node, training replaced by a
    random fp16 upload of exactly the ordered structure; records the global each node
    trained with."""

    def __init__(self, monkeypatch, nodes: dict[int, int]) -> None:
        from fedapp import client_app

        self.app = client_app
        self.grid = FakeGrid(nodes)
        devices = [DeviceProfile("phone", slowdown=2.0)] + [DeviceProfile("edge")] * 3
        self.strategy = FedPipe(SETUP, BIG, local_steps=2, alpha_ratio=2.0,
                                min_available_nodes=len(nodes), rank_grid=[2, 4], costs=COSTS,
                                devices=devices, step_seconds=7.0, rank_budget=16,
                                min_share=0.5)
        self.contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={},
                                    node_config={"partition-id": p, "num-partitions": 4})
                         for n, p in nodes.items()}
        self.arrays = ArrayRecord()
        self.trained_with: dict[int, dict[str, torch.Tensor]] = {}
        monkeypatch.setattr(client_app, "run_round", self.fake_round)

    def fake_round(self, setup, order, partition_id, num_partitions, global_state,
                   units=None):
        from fedapp.client.round import RoundResult

        self.trained_with[partition_id] = dict(global_state)
        gen = torch.Generator().manual_seed(100 * order.server_round + partition_id)
        state = {}
        for module, r in zip(sorted(BIG), order.pipe.ranks, strict=True):
            if r:
                scale = 1.0 + 3.0 * torch.rand(1, generator=gen).item()  # uneven importance
                out_f, in_f = BIG[module]
                state[module + LORA_A] = (scale * torch.randn(r, in_f, generator=gen)).half()
                state[module + LORA_B] = torch.randn(out_f, r, generator=gen).half()
        return RoundResult(state, {"num-examples": 10.0 + partition_id, "train-loss": 1.0,
                                   "training-started": time.time()})

    def play(self, server_round: int) -> dict[int, Message]:
        self.trained_with = {}
        sent = {m.metadata.dst_node_id: m for m in self.strategy.configure_train(
            server_round, self.arrays, ConfigRecord(), self.grid)}
        replies = [self.app.train(msg, self.contexts[n]) for n, msg in sent.items()]
        self.arrays, _ = self.strategy.aggregate_train(server_round, replies)
        return sent


def test_returning_fedpipe_clients_rebuild_the_global_from_the_other_slots(monkeypatch):
    """Slots cover different modules (a phone's window is 2 of 3 layers) and change with
    importance after round 1; from round 2 on every round truncates (budget 16). A client
    that uploaded in round t receives only the others' slots and trains with the server's
    G_t, bitwise."""
    fed = PipeFederation(monkeypatch, {11: 0, 12: 1, 13: 2, 14: 3})
    sent, globals_ = {}, {}
    for t in (1, 2, 3):
        sent[t] = fed.play(t)
        globals_[t] = (fed.arrays.to_torch_state_dict(), fed.trained_with)
    assert fed.strategy.round_log[2].figures["svd-dropped-error"] > 0
    for t in (2, 3):
        g_prev, trained = globals_[t - 1][0], globals_[t][1]
        for node, msg in sent[t].items():
            version = GlobalVersion.from_dict(msg.content.config_records[GLOBAL])
            assert version.increment is not None and version.increment.per_module
            got = trained[fed.grid.partitions[node]]
            assert set(got) <= set(g_prev)
            for key, value in g_prev.items():  # what the client lacks is zero on the server
                if key in got:
                    assert got[key].dtype == torch.float16 and torch.equal(got[key], value), key
                else:
                    assert not value.any(), key
    # the structures changed after the first round, and the phone never trained layer 0
    first = TrainOrder.from_dict(sent[1][11].content["config"]).pipe.ranks
    later = TrainOrder.from_dict(sent[3][11].content["config"]).pipe.ranks
    assert first[:2] == (0, 0) and later[:2] == (0, 0) and first != later
    # an increment is smaller than all of G for a returning client
    full = fed.strategy.client_arrays(fed.strategy.identities[12], globals_[2][0])
    assert sent[3][12].content["arrays"].count_bytes() < full.count_bytes()
