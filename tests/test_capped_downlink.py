"""FLoRA's capped downlink: a returning client whose exact global would cost more than
`downlink_cap` times its upload gets the best low-rank correction of what it holds; both
sides rebuild the same copy, and what is left out is sent later (error feedback).

The pure functions (`strategies.downlink_math`) against dense oracles; then the real
strategy and ClientApp handler (training replaced by random uploads, as in
test_downlink.py) over rounds.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from flwr.app import ConfigRecord

from fedapp import client_app
from strategies.downlink_math import (
    correction,
    correction_rank,
    difference,
    lag,
    per_rank_bytes,
    squared_norm,
)
from strategies.fedpipe import FedPipe
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA, receive_global
from strategies.global_version import Correction, GlobalVersion, Increment
from strategies.lora_math import digest, join_factors, next_global, split_factors
from strategies.protocol import GLOBAL, NO_GLOBAL
from tests.test_downlink import (  # noqa: F401  task_identity: an autouse fixture
    MODULES,
    RANKS,
    SETUP,
    Federation,
    factors,
    product,
    task_identity,
)


def dense(f: dict, module: str) -> torch.Tensor:
    return product(f, module) if module in f else torch.zeros(MODULES[module], dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# The pure functions


def test_difference_is_target_minus_held_and_a_missing_module_counts_as_zero():
    target, held = factors([6], seed=1)[0], factors([3], seed=2)[0]
    del held["base_model.model.layer.v_proj"]

    diff = difference(target, held)

    for m in MODULES:
        torch.testing.assert_close(product(diff, m), dense(target, m) - dense(held, m),
                                   rtol=0, atol=1e-12)


def test_correction_is_the_best_rank_m_of_the_difference():
    target, held = factors([6], seed=3)[0], factors([5], seed=4)[0]

    small = correction(target, held, 3, torch.float64)
    whole = correction(target, held, 11, torch.float64)  # G − H has rank 11: all of it

    for m in MODULES:
        d = dense(target, m) - dense(held, m)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        assert small[m][0].shape[0] == 3
        torch.testing.assert_close(product(small, m), (u[:, :3] * s[:3]) @ vh[:3],
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(product(whole, m), d, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"correction rank=0; allowed: a positive integer"):
        correction(target, held, 0, torch.float16)


def test_lag_and_squared_norm_match_the_dense_frobenius_norms():
    target, held = factors([6], seed=5)[0], factors([4], seed=6)[0]

    got = lag(target, held)

    gap = sum(float(((dense(target, m) - dense(held, m)) ** 2).sum()) for m in MODULES)
    total = sum(float((dense(target, m) ** 2).sum()) for m in MODULES)
    assert got == pytest.approx(math.sqrt(gap / total), rel=1e-10)
    a, b = target["base_model.model.layer.q_proj"]
    assert squared_norm(a, b) == pytest.approx(float((b.double() @ a.double()).pow(2).sum()),
                                               rel=1e-10)
    assert lag(target, target) == pytest.approx(0.0, abs=1e-6)
    assert lag(target, {}) == 1.0


def test_correction_rank_is_the_most_directions_that_fit():
    # one rank over MODULES: (48 + 64) + (48 + 40) values of 2 bytes = 400 bytes
    assert per_rank_bytes(factors([3], seed=7)[0], torch.float16) == 400
    assert correction_rank(1200, 400) == 3
    assert correction_rank(1199.5, 400) == 2
    assert correction_rank(399, 400) == 0
    assert correction_rank(-5, 400) == 0


def test_the_correction_record_round_trips_and_excludes_an_increment():
    version = GlobalVersion(4, correction=Correction(34, 2))

    assert GlobalVersion.from_dict(version.to_dict()) == version
    with pytest.raises(ValueError, match=r"correction-rank-budget=0; allowed: a positive"):
        Correction(0, 2)
    with pytest.raises(ValueError, match=r"correction-held-version=-1; allowed: an int >= 0"):
        Correction(34, -1)
    with pytest.raises(ValueError, match=r"global-correction=.*allowed: none with an incr"):
        GlobalVersion(4, Increment(34, (4,), (1.0,), 0, "ab"), Correction(34, 2))


def test_receive_global_applies_a_correction_to_the_copy_it_was_made_for():
    held = join_factors(factors([6], seed=8)[0])
    fix = join_factors(factors([3], seed=9)[0])
    version = GlobalVersion(5, correction=Correction(7, 3))  # for the copy of version 3

    got = receive_global(version, fix, held, 3, None, torch.float16, held_exact=False)

    want, _ = next_global(split_factors(held), split_factors(fix), 7, torch.float16)
    assert got.keys() == join_factors(want).keys()
    for key, value in join_factors(want).items():
        assert torch.equal(got[key], value)
    with pytest.raises(RuntimeError, match=f"{NO_GLOBAL}: .*copy of version 3; this node "
                                           "holds 4"):
        receive_global(version, fix, held, 4, None, torch.float16)
    with pytest.raises(RuntimeError, match=f"{NO_GLOBAL}: .*this node holds none"):
        receive_global(version, fix, None, None, None, torch.float16)


def test_an_increment_is_refused_on_a_corrected_copy():
    held = join_factors(factors([4], seed=8)[0])
    upload = join_factors(factors([8], seed=9)[0])
    inc = Increment(34, (8,), (0.5,), 0, digest(upload))

    with pytest.raises(RuntimeError, match=f"{NO_GLOBAL}: .*holds a corrected one"):
        receive_global(GlobalVersion(5, inc), {}, held, 4, upload, torch.float16,
                       held_exact=False)


@pytest.mark.parametrize("cap", [0, -1.0, True, "2", float("inf")])
def test_a_bad_cap_is_refused_before_training(cap):
    with pytest.raises(ValueError, match=r"strategy.downlink_cap=.*allowed: null .* a number > 0"):
        FLoRA(SETUP, MODULES, local_steps=1, ranks=RANKS, alpha_ratio=2.0, rank_budget=34,
              min_available_nodes=1, min_train_nodes=1, downlink_cap=cap)


@pytest.mark.parametrize("strategy", [FedPipe, FlexLoRA])
def test_a_cap_is_refused_where_clients_hold_another_global(strategy):
    ranks = {} if strategy is FedPipe else {"ranks": RANKS}
    with pytest.raises(ValueError, match=rf"downlink_cap=2.0 with strategy {strategy.name}, "
                                         r"whose clients .*; allowed: null"):
        strategy(SETUP, MODULES, local_steps=1, alpha_ratio=2.0, rank_budget=34,
                 min_available_nodes=1, min_train_nodes=1, downlink_cap=2.0, **ranks)


# ---------------------------------------------------------------------------------------
# Rounds through the strategy and the ClientApp


def kind(msg) -> str:
    version = GlobalVersion.from_dict(msg.content.config_records[GLOBAL])
    return "correction" if version.correction else "increment" if version.increment else "all"


def test_capped_messages_stay_under_the_cap_and_both_sides_hold_the_same_copy(monkeypatch):
    # Prepare: ranks 4, 8, 16, 8, budget 34: the others' slots are 8x, 3.5x, 1.25x, 3.5x an
    # upload; with a cap of 2 the rank-4 and rank-8 clients get corrections
    fed = Federation(monkeypatch, {11: 0, 12: 1, 13: 2, 14: 3}, downlink_cap=2.0)
    fed.play(1)

    # Execute
    strategy, rounds, copies = fed.strategy, {}, {}
    for t in (2, 3, 4):
        rounds[t] = fed.play(t), fed.trained_with
        copies[t] = dict(strategy.copies)  # what the server believes each holds

    # Assert
    for t, (sent, trained) in rounds.items():
        assert [kind(sent[n]) for n in (11, 12, 13, 14)] == [
            "correction", "correction", "increment", "correction"], t
        for node in sent:
            name = f"partition-{fed.grid.partitions[node]}"
            up = strategy.round_log[t - 1].clients[name].bytes_up
            assert strategy.round_log[t].clients[name].bytes_down <= 2.0 * up  # all of it
            # what the client trained with is what the server believes it holds, bitwise
            held = join_factors(copies[t][name].factors)
            assert trained[fed.grid.partitions[node]].keys() == held.keys()
            assert all(torch.equal(trained[fed.grid.partitions[node]][k], v)
                       for k, v in held.items())
        lags = {n: c.extra["downlink-lag"] for n, c in strategy.round_log[t].clients.items()}
        assert lags["partition-2"] == 0.0  # the exact increment
        assert all(0.0 < lags[n] < 1.0 for n in ("partition-0", "partition-1", "partition-3"))
    # the rank-8 clients get twice the directions of the rank-4 one: they trail less
    assert strategy.round_log[4].clients["partition-1"].extra["downlink-lag"] < \
        strategy.round_log[4].clients["partition-0"].extra["downlink-lag"]


def test_what_a_correction_leaves_out_is_sent_later(monkeypatch):
    # Prepare: after round 1 every upload is zero, so G stops moving and only the
    # corrections change what the clients hold
    fed = Federation(monkeypatch, {11: 0, 12: 1, 13: 2, 14: 3}, downlink_cap=2.0)
    fed.play(1)
    real_round = fed.fake_round

    def zero_round(*args, **kwargs):
        result = real_round(*args, **kwargs)
        return type(result)({k: torch.zeros_like(v) for k, v in result.state.items()},
                            result.metrics)

    monkeypatch.setattr(client_app, "run_round", zero_round)

    # Execute
    lags = []
    for t in range(2, 8):
        fed.play(t)
        lags.append(fed.strategy.round_log[t].clients["partition-0"].extra["downlink-lag"])

    # Assert: the rank-4 client's lag (0.55 after round 2 here) shrinks round after round
    # until only fp16 rounding is left (G has rank 34, the corrections 7 directions each)
    assert lags[0] > 0.2, lags
    assert all(later < earlier for earlier, later in itertools.pairwise(lags[:4])), lags
    assert max(lags[3:]) < 1e-3, lags


def test_a_client_that_lost_its_copy_gets_all_of_the_global_after_a_correction(monkeypatch):
    fed = Federation(monkeypatch, {11: 0, 12: 1, 13: 2}, downlink_cap=2.0)
    fed.play(1)
    assert kind(fed.play(2)[11]) == "correction"
    fed.contexts[11].state.array_records.pop(client_app.HELD_GLOBAL)

    sent3 = fed.play(3)
    g3 = fed.arrays.to_torch_state_dict()
    sent4 = fed.play(4)

    assert kind(sent3[11]) == "correction"
    assert NO_GLOBAL in fed.strategy.round_log[3].clients["partition-0"].status
    assert kind(sent4[11]) == "all"
    assert fed.trained_with[0].keys() == g3.keys()
    assert all(torch.equal(fed.trained_with[0][k], v) for k, v in g3.items())


def test_a_client_whose_reply_was_lost_gets_all_of_the_global_without_a_failed_round(
        monkeypatch):
    # Prepare: round 3's reply of node 11 never arrives, though it took its correction
    fed = Federation(monkeypatch, {11: 0, 12: 1, 13: 2}, downlink_cap=2.0)
    fed.play(1)
    fed.play(2)
    strategy = fed.strategy
    sent3 = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        3, fed.arrays, ConfigRecord(), fed.grid)}
    replies = {node: client_app.train(msg, fed.contexts[node]) for node, msg in sent3.items()}
    fed.arrays, _ = strategy.aggregate_train(3, [r for n, r in replies.items() if n != 11])

    # Execute
    sent4 = fed.play(4)

    # Assert: round 3 sent a correction that got no reply; round 4 sends all of G, which
    # node 11 trains with: no round lost to a correction it could not apply
    assert kind(sent3[11]) == "correction"
    assert strategy.round_log[3].clients["partition-0"].status == "no reply"
    assert kind(sent4[11]) == "all"
    assert strategy.round_log[4].clients["partition-0"].status == "ok"


def test_without_a_cap_the_server_keeps_no_copies_of_the_global(monkeypatch):
    fed = Federation(monkeypatch, {11: 0, 12: 1})
    fed.play(1)
    fed.play(2)

    assert sorted(fed.strategy.copies) == ["partition-0", "partition-1"]
    assert all(c.exact and c.factors is None for c in fed.strategy.copies.values())
