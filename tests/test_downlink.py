"""FLoRA's versioned downlink: a client that uploaded in round t gets, in round t+1, only
the other clients' slots of Δ_t and rebuilds G_t itself, bitwise equal to the server's.

The pure functions (`lora_math.next_global`, slots, digests, `flora.receive_global`) are
checked against dense oracles; then the real strategy and the real ClientApp handler (with
training replaced by random uploads) play rounds with heterogeneous ranks, truncation, a
client that skips a round, a client that lost its copy and a node that restarted.
"""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedapp import client_app
from fedapp.client.round import RoundResult
from strategies.base import config_bytes
from strategies.flora import FLoRA, receive_global
from strategies.global_version import GlobalVersion, Increment
from strategies.lora_math import (
    cat_slots,
    digest,
    join_factors,
    next_global,
    split_factors,
    split_slots,
    stack_scaled,
    wire_stack,
)
from strategies.protocol import GLOBAL, NO_GLOBAL, NO_SETUP, RunSetup, TrainOrder
from tests.test_strategies import FakeGrid

MODULES = {"base_model.model.layer.q_proj": (64, 48), "base_model.model.layer.v_proj": (40, 48)}
SETUP = RunSetup(model_path="m", quantization="nf4", target_modules=("q_proj", "v_proj"),
                 lr=0.1, batch_size=1, max_length=8, partitioner="iid", partitioner_alpha=0.0)
RANKS = [4, 8, 16, 8]  # the default run's, cycled over partition ids
BUDGET = 34  # Σ r = 36 > 34: every round truncates; Σ_{j≠k} r_j ≤ 32 < 34: increments pay


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def factors(ranks: list[int], seed: int, dtype: torch.dtype = torch.float16) -> list[dict]:
    """Random slots of `ranks` over MODULES, rounded to `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    return [{m: ((0.3 * torch.randn(r, i, generator=gen)).to(dtype),  # lora_A (r, in)
                 (0.3 * torch.randn(o, r, generator=gen)).to(dtype))  # lora_B (out, r)
             for m, (o, i) in MODULES.items()} for r in ranks]


def product(f: dict, module: str) -> torch.Tensor:
    a, b = f[module]
    return b.double() @ a.double()  # (out, R) @ (R, in) -> (out, in)


# ---------------------------------------------------------------------------------------
# The pure functions


def test_split_slots_inverts_cat_slots_for_mixed_ranks():
    slots = factors([4, 8, 16], seed=0)

    back = split_slots(cat_slots(slots), [4, 8, 16])

    for got, want in zip(back, slots, strict=True):
        for m in MODULES:
            assert torch.equal(got[m][0], want[m][0]) and torch.equal(got[m][1], want[m][1])
    with pytest.raises(ValueError, match=r"has rank 28; the slots of ranks \[4, 8\] need 12"):
        split_slots(cat_slots(slots), [4, 8])


def test_next_global_within_budget_is_the_exact_stack_at_wire_precision():
    # Prepare: G_{t-1} of rank 4, Δ of ranks 2 + 3 with coefficients 0.5 and 0.25
    prev = factors([4], seed=1)[0]
    parts = list(zip((0.5, 0.25), factors([2, 3], seed=2), strict=True))

    # Execute
    got, dropped = next_global(prev, stack_scaled(parts), budget=9, dtype=torch.float16)

    # Assert: rank 9, nothing dropped, the factors are the stack cast to fp16, bitwise
    assert dropped == 0.0
    for m in MODULES:
        want_a = torch.cat([prev[m][0].double()] + [c * f[m][0].double() for c, f in parts])
        want_b = torch.cat([prev[m][1].double()] + [f[m][1].double() for _, f in parts], 1)
        assert torch.equal(got[m][0], want_a.half()) and torch.equal(got[m][1], want_b.half())


def test_next_global_past_budget_is_the_best_rank_k_of_the_sum():
    prev = factors([6], seed=3)[0]
    parts = list(zip((0.4, 0.6), factors([4, 8], seed=4), strict=True))

    got, dropped = next_global(prev, stack_scaled(parts), budget=5, dtype=torch.float64)

    for m in MODULES:
        dense = product(prev, m) + sum(c * product(f, m) for c, f in parts)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        torch.testing.assert_close(product(got, m), (u[:, :5] * s[:5]) @ vh[:5],
                                   rtol=1e-10, atol=1e-10)
    assert 0 < dropped < 1


def test_the_wire_stack_is_a_copy_whose_scaled_values_equal_the_float64_stack_bitwise():
    # Prepare: fp16 uploads of ranks 2, 3 and 1 with coefficients that round in float64
    parts = list(zip((0.1, 1 / 3, 0.7), factors([2, 3, 1], seed=7), strict=True))

    # Execute
    stack = wire_stack(parts)

    # Assert: the factors are the uploads as they came (fp16), one coefficient per row,
    # and scaling them gives exactly stack_scaled's float64 values
    want = stack_scaled(parts)
    for m in MODULES:
        a, b = stack.factors[m]
        assert a.dtype == b.dtype == torch.float16
        assert torch.equal(a, torch.cat([f[m][0] for _, f in parts]))
        assert stack.coefficients[m].tolist() == [0.1, 0.1, 1 / 3, 1 / 3, 1 / 3, 0.7]
        got_a, got_b = stack.scaled()[m]
        assert torch.equal(got_a, want[m][0]) and torch.equal(got_b, want[m][1])


@pytest.mark.parametrize("budget", [12, 5])
def test_next_global_from_the_wire_stack_equals_it_from_the_float64_stack(budget):
    # Prepare: G_{t-1} of rank 6; Δ of ranks 4 + 2; within the budget (12) and past it (5)
    prev = factors([6], seed=8)[0]
    parts = list(zip((0.25, 0.75), factors([4, 2], seed=9), strict=True))

    # Execute
    lazy, lazy_dropped = next_global(prev, wire_stack(parts), budget, torch.float16)
    dense, dense_dropped = next_global(prev, stack_scaled(parts), budget, torch.float16)

    # Assert: bitwise the same global and the same dropped error
    assert lazy_dropped == dense_dropped
    for m in MODULES:
        assert torch.equal(lazy[m][0], dense[m][0]) and torch.equal(lazy[m][1], dense[m][1])


def test_the_signs_of_the_held_factors_do_not_change_the_next_global():
    # Prepare: the same G_{t-1} with some singular directions negated (another LAPACK)
    prev = factors([6], seed=5, dtype=torch.float64)[0]
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    flipped = {m: (signs[:, None] * a, b * signs) for m, (a, b) in prev.items()}
    delta = stack_scaled([(0.7, factors([8], seed=6)[0])])

    # Execute
    one, _ = next_global(prev, delta, 7, torch.float64)
    other, _ = next_global(flipped, delta, 7, torch.float64)

    # Assert: B @ A, all that enters the model, is the same
    for m in MODULES:
        torch.testing.assert_close(product(one, m), product(other, m), rtol=1e-12, atol=1e-12)


def test_digest_names_content_exactly():
    state = join_factors(factors([4], seed=7)[0])
    changed = {k: v.clone() for k, v in state.items()}
    key = next(iter(changed))
    changed[key].view(torch.int16)[0, 0] ^= 1  # one bit

    assert digest(state) == digest({k: v.clone() for k, v in state.items()})
    assert digest(changed) != digest(state)
    assert digest({k: v.float() for k, v in state.items()}) != digest(state)


def test_global_version_round_trips_and_refuses_bad_increments():
    version = GlobalVersion(3, Increment(64, (4, 8, 16), (0.1 + 0.2, 1 / 3, 2.0), 1, "ab"))

    assert GlobalVersion.from_dict(version.to_dict()) == version  # floats round-trip exactly
    assert GlobalVersion.from_dict(GlobalVersion(0).to_dict()) == GlobalVersion(0)
    with pytest.raises(ValueError, match=r"increment-own-slot=3; allowed: 0 <= slot < 3"):
        Increment(64, (4, 8, 16), (1.0, 1.0, 1.0), 3, "ab")
    with pytest.raises(ValueError, match="increment-coefficients"):
        Increment(64, (4, 8), (1.0,), 0, "ab")


def test_receive_global_refuses_an_increment_it_cannot_apply():
    held = join_factors(factors([4], seed=8)[0])
    upload = join_factors(factors([8], seed=9)[0])
    inc = Increment(BUDGET, (8,), (0.5,), 0, digest(upload))

    def receive(held_version, own):
        return receive_global(GlobalVersion(5, inc), {}, held, held_version, own,
                              torch.float16)

    with pytest.raises(RuntimeError, match=f"{NO_GLOBAL}: .*needs version 4; this node holds 3"):
        receive(3, upload)
    with pytest.raises(RuntimeError, match=f"{NO_GLOBAL}: .*an upload of this node's"):
        receive(4, join_factors(factors([8], seed=10)[0]))
    assert receive(4, upload).keys() == held.keys()  # its own slot alone: nothing sent


# ---------------------------------------------------------------------------------------
# Rounds through the strategy and the ClientApp


class Federation:
    """A FLoRA server and one ClientApp context per node; `train` is the real handler with
    training replaced by a random fp16 upload, recording the global each node trained with."""

    def __init__(self, monkeypatch, nodes: dict[int, int], rank_budget: int = BUDGET,
                 **strategy_kwargs) -> None:
        self.grid = FakeGrid(nodes)
        self.strategy = FLoRA(SETUP, MODULES, local_steps=1, ranks=RANKS, alpha_ratio=2.0,
                              rank_budget=rank_budget, min_available_nodes=len(nodes),
                              min_train_nodes=1, **strategy_kwargs)
        self.contexts = {n: self.context(n) for n in nodes}
        self.arrays = ArrayRecord()
        self.trained_with: dict[int, dict[str, torch.Tensor]] = {}
        monkeypatch.setattr(client_app, "run_round", self.fake_round)

    def context(self, node: int) -> Context:
        return Context(run_id=1, node_id=node, state=RecordDict(), run_config={}, node_config={
            "partition-id": self.grid.partitions[node], "num-partitions": 4})

    def fake_round(self, setup, order: TrainOrder, partition_id, num_partitions, global_state,
                   units=None):
        self.trained_with[partition_id] = dict(global_state)
        upload = factors([order.lora_r], seed=100 * order.server_round + partition_id)[0]
        return RoundResult(join_factors(upload), {"num-examples": 10.0 + partition_id,
                                                  "train-loss": 1.0,
                                                  "training-started": time.time()})

    def play(self, server_round: int) -> dict[int, Message]:
        """One round; returns the train messages sent, by node."""
        self.trained_with = {}
        sent = {m.metadata.dst_node_id: m for m in self.strategy.configure_train(
            server_round, self.arrays, ConfigRecord(), self.grid)}
        replies = []
        for node, msg in sent.items():
            try:
                replies.append(client_app.train(msg, self.contexts[node]))
            except RuntimeError as err:  # as Flower turns a ClientApp exception into a reply
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=msg))
        self.arrays, _ = self.strategy.aggregate_train(server_round, replies)
        return sent


def increment_of(msg: Message) -> Increment | None:
    return GlobalVersion.from_dict(msg.content.config_records[GLOBAL]).increment


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == torch.float16 and torch.equal(got[key], value), key


def test_returning_clients_rebuild_the_servers_global_bitwise(monkeypatch):
    # Prepare: four nodes, ranks 4, 8, 16, 8; global rank budget 34 (truncation every round)
    fed = Federation(monkeypatch, {11: 0, 12: 1, 13: 2, 14: 3})
    fed.play(1)
    g1 = fed.arrays.to_torch_state_dict()
    del fed.grid.partitions[14]  # partition 3 skips round 2

    # Execute: round 2, three returning clients; round 3, partition 3 is back and
    # partition 1 lost its copy of the global; round 4, everyone
    sent2, trained2 = fed.play(2), fed.trained_with
    g2 = fed.arrays.to_torch_state_dict()
    fed.grid.partitions[14] = 3
    fed.contexts[12].state.array_records.pop(client_app.HELD_GLOBAL)
    sent3, trained3 = fed.play(3), fed.trained_with
    g3 = fed.arrays.to_torch_state_dict()
    sent4, trained4 = fed.play(4), fed.trained_with

    # Assert: round 2, every client an increment, and G_1 rebuilt bitwise
    assert all(fed.strategy.round_log[t].figures["svd-dropped-error"] > 0 for t in (1, 2, 3))
    assert all(increment_of(m) is not None for m in sent2.values())
    for pid in (0, 1, 2):
        assert_bitwise(trained2[pid], g1)
    # round 3: the skipper gets all of G_2; partition 1 fails with NO_GLOBAL; the rest rebuild
    assert increment_of(sent3[14]) is None
    assert increment_of(sent3[11]) is not None and increment_of(sent3[13]) is not None
    status = fed.strategy.round_log[3].clients["partition-1"].status
    assert NO_GLOBAL in status and 1 not in trained3
    for pid in (0, 2, 3):
        assert_bitwise(trained3[pid], g2)
    # round 4: partition 1 gets all of G_3, the others increments; all hold G_3, which is
    # also what the server evaluates
    assert increment_of(sent4[12]) is None
    assert all(increment_of(sent4[n]) is not None for n in (11, 13, 14))
    for pid in range(4):
        assert_bitwise(trained4[pid], g3)
    assert_bitwise(fed.strategy.global_adapter(ArrayRecord(g3))[0], g3)


def test_a_returning_client_downloads_the_others_slots_only(monkeypatch):
    # Prepare
    fed = Federation(monkeypatch, {11: 0, 12: 1, 13: 2, 14: 3})
    fed.play(1)
    g1 = fed.arrays.to_torch_state_dict()
    uploads = {pid: join_factors(factors([RANKS[pid]], seed=100 + pid)[0]) for pid in range(4)}

    # Execute
    sent = fed.play(2)

    # Assert: bytes down = the other clients' slots + the order and the version record
    for node, msg in sent.items():
        pid = fed.grid.partitions[node]
        others = [split_factors(uploads[j]) for j in range(4) if j != pid]
        want = ArrayRecord(join_factors(cat_slots(others))).count_bytes()
        payload = sum(2 * (sum(RANKS) - RANKS[pid]) * (o + i) for o, i in MODULES.values())
        config = config_bytes(msg.content["config"]) + config_bytes(msg.content[GLOBAL])
        assert msg.content["arrays"].count_bytes() == want
        assert payload < want < payload + 1000  # fp16 values plus a little metadata
        assert fed.strategy.assignments[node].bytes_down == want + config
        assert want < ArrayRecord(g1).count_bytes()  # all of G_1: rank 34


def test_all_of_the_global_goes_when_it_is_smaller_than_the_increment(monkeypatch):
    # Prepare: budget 24; the others' slots have rank 32, 28, 20, 28
    fed = Federation(monkeypatch, {11: 0, 12: 1, 13: 2, 14: 3}, rank_budget=24)
    fed.play(1)
    g1 = fed.arrays.to_torch_state_dict()

    # Execute
    sent = fed.play(2)

    # Assert: only the rank-16 client (others 20 < 24) gets an increment; all hold G_1
    assert [increment_of(sent[n]) is not None for n in (11, 12, 13, 14)] == [
        False, False, True, False]
    for pid in range(4):
        assert_bitwise(fed.trained_with[pid], g1)


def test_a_restarted_node_loses_one_round_then_gets_setup_and_global(monkeypatch):
    # Prepare
    fed = Federation(monkeypatch, {11: 0, 12: 1})
    fed.play(1)
    fed.contexts[12] = fed.context(12)  # a SuperNode restart: its context state is empty

    # Execute
    sent2 = fed.play(2)
    g2 = fed.arrays.to_torch_state_dict()
    sent3 = fed.play(3)

    # Assert: round 2 lost for the restarted node; round 3 brings it the setup and all of
    # G_2, while node 11, alone in Δ_2, gets an increment with nothing in it
    assert NO_SETUP in fed.strategy.round_log[2].clients["partition-1"].status
    assert increment_of(sent2[11]) is not None
    assert "setup" in sent3[12].content and increment_of(sent3[12]) is None
    assert increment_of(sent3[11]) is not None and len(sent3[11].content["arrays"]) == 0
    assert_bitwise(fed.trained_with[0], g2)
    assert_bitwise(fed.trained_with[1], g2)


def test_retries_resumes_and_dp_send_all_of_the_global(monkeypatch):
    # Prepare
    fed = Federation(monkeypatch, {11: 0, 12: 1})
    fed.play(1)
    fed.strategy.load_state({}, fed.arrays)  # a retried attempt or a resumed run
    dp = Federation(monkeypatch, {11: 0, 12: 1}, dp={"clip_norm": 1.0, "noise_multiplier": 1.0,
                                                     "delta": 1e-5})
    dp.play(1)
    dp_g1 = dp.arrays.to_torch_state_dict()

    # Execute
    sent = fed.play(2)
    dp_sent = dp.play(2)

    # Assert
    assert all(increment_of(m) is None for m in sent.values())
    assert all(GLOBAL not in m.content.config_records for m in dp_sent.values())
    assert_bitwise(dp.trained_with[0], dp_g1)  # DP's global is held at wire precision too
