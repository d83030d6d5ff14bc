"""The baselines FLoRA is measured against: zero-padding, FlexLoRA, FFA-LoRA (one-shot
aggregation and late clients are in test_oneshot.py).

The pure math is checked against hand-computed values or a dense torch oracle; the
strategies are driven through Flower's message API with the fake Grid of test_strategies.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from strategies.ffa import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.lora_math import (
    LORA_A,
    LORA_B,
    LoraUpdate,
    average_b,
    exact_delta,
    factors_for_client,
    fresh_rows,
    keep_untrained,
    relative_error,
    split_factors,
    zeropad_factors,
)
from strategies.zeropad import ZeroPad
from tests.test_strategies import (  # noqa: F401  (task_identity is an autouse fixture)
    MODULES,
    SETUP,
    FakeGrid,
    adapter,
    reply,
    task_identity,
)


def random_update(r: int, scaling: float, weight: float, seed: int,
                  dtype: torch.dtype = torch.float32) -> LoraUpdate:
    """A rank-r adapter over MODULES with random non-zero A and B."""
    return LoraUpdate(split_factors({k: v.to(dtype) for k, v in adapter(r, seed).items()}),
                      scaling, weight)


def by_rank(messages) -> dict[int, object]:
    """{lora-r: message}, for grids where every client has its own rank."""
    return {m.content["config"]["lora-r"]: m for m in messages}


def dense_best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Eckart–Young by a dense SVD: the best rank-k approximation of `matrix`."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]  # (out, k) @ (k, in) -> (out, in)


# ---------------------------------------------------------------------------------------
# Zero-padding


def hand_zeropad_updates() -> list[LoraUpdate]:
    """One 2x2 module; client 1: r=1, s=1, n=1; client 2: r=2, s=2, n=3 (p = 1/4, 3/4)."""
    m = "m"
    return [
        LoraUpdate({m: (torch.tensor([[1.0, 2.0]]),  # A1 (1, 2)
                        torch.tensor([[1.0], [0.0]]))}, 1.0, 1.0),  # B1 (2, 1)
        LoraUpdate({m: (torch.tensor([[1.0, 0.0], [0.0, 1.0]]),  # A2 (2, 2)
                        torch.tensor([[1.0, 1.0], [0.0, 2.0]]))}, 2.0, 3.0),  # B2 (2, 2)
    ]


def test_zeropad_factors_hand_computed():
    # Prepare
    updates = hand_zeropad_updates()

    # Execute
    a, b = zeropad_factors(updates)["m"]

    # Assert: A = 1/4·[[1, 2], [0, 0]] + 3/4·2·I ; B = 1/4·[[1, 0], [0, 0]] + 3/4·B2
    torch.testing.assert_close(a, torch.tensor([[1.75, 0.5], [0.0, 1.5]]))
    torch.testing.assert_close(b, torch.tensor([[1.0, 0.75], [0.0, 1.5]]))


def test_zeropad_loses_exactness_by_the_hand_computed_relative_error():
    # Prepare: B @ A = [[1.75, 1.625], [0, 2.25]] while Σ p s B_k A_k = [[1.75, 2], [0, 3]];
    # the difference [[0, -0.375], [0, -0.75]] has ‖·‖² = 45/64, the exact update 257/16
    updates = hand_zeropad_updates()
    padded = zeropad_factors(updates)
    a, b = padded["m"]
    exact = exact_delta(updates, "m")
    dense = float(torch.linalg.matrix_norm(b @ a - exact) / torch.linalg.matrix_norm(exact))

    # Execute
    err = relative_error(padded, updates)

    # Assert
    torch.testing.assert_close(b @ a, torch.tensor([[1.75, 1.625], [0.0, 2.25]]))
    torch.testing.assert_close(exact, torch.tensor([[1.75, 2.0], [0.0, 3.0]]))
    assert err > 0
    assert err == pytest.approx(math.sqrt(45 / 1028), rel=1e-6)
    assert err == pytest.approx(dense, rel=1e-6)


def test_zeropad_is_exact_for_one_client():
    # Prepare: one client with scaling 2 (folded into A by the padding)
    updates = [random_update(3, 2.0, 7.0, seed=4)]

    # Execute
    padded = zeropad_factors(updates)
    err = relative_error(padded, updates)

    # Assert
    assert err == pytest.approx(0.0, abs=1e-6)
    for module in MODULES:
        a, b = padded[module]
        torch.testing.assert_close(b @ a, exact_delta(updates, module))


def test_zeropad_strategy_truncates_downloads_and_logs_its_error():
    # Prepare: two clients of ranks 1 and 2, lora_alpha = 2·r (scaling 2)
    grid = FakeGrid({1: 0, 2: 1})
    strategy = ZeroPad(SETUP, MODULES, local_steps=1, ranks=[1, 2], alpha_ratio=2.0)
    msgs = by_rank(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    states = {1: adapter(1, 21), 2: adapter(2, 22)}
    updates = [LoraUpdate(split_factors(states[r]), 2.0, n) for r, n in ((1, 1.0), (2, 3.0))]

    # Execute: one round, then round 2's downloads
    arrays, metrics = strategy.aggregate_train(1, [reply(msgs[1], states[1], 1.0),
                                                   reply(msgs[2], states[2], 3.0)])
    round2 = by_rank(strategy.configure_train(2, arrays, ConfigRecord(), grid))

    # Assert: the global is the padded average; the rank-1 client gets its first row of A
    # (scaling undone) and first column of B, in fp16
    assert metrics["zeropad-error"] == pytest.approx(
        relative_error(zeropad_factors(updates), updates), rel=1e-5)
    global_state, rank, alpha = strategy.global_adapter(arrays)
    assert (rank, alpha) == (2, 2.0)  # scaling folded into A: a peft LoRA with scaling 1
    for module, (a, b) in zeropad_factors(updates).items():
        torch.testing.assert_close(global_state[module + LORA_A], a)
        torch.testing.assert_close(global_state[module + LORA_B], b)
    down = round2[1].content["arrays"].to_torch_state_dict()
    module = next(iter(MODULES))
    assert down[module + LORA_A].shape == (1, MODULES[module][1])
    assert down[module + LORA_A].dtype == torch.float16
    torch.testing.assert_close(down[module + LORA_A],
                               (global_state[module + LORA_A][:1] / 2.0).half())
    torch.testing.assert_close(down[module + LORA_B], global_state[module + LORA_B][:, :1].half())


def test_keep_untrained_and_fresh_rows_hand_computed():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])  # rank 1, in 2, out 2
    pa, pb = torch.tensor([[9.0, 9.0], [5.0, 6.0]]), torch.tensor([[9.0, 7.0], [9.0, 8.0]])

    kept = keep_untrained({"m": (a, b)}, {"m": (pa, pb)})["m"]
    grown = fresh_rows({"m": (a, b)}, 3, seed=1)["m"]

    torch.testing.assert_close(kept[0], torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
    torch.testing.assert_close(kept[1], torch.tensor([[3.0, 7.0], [4.0, 8.0]]))
    assert keep_untrained({"m": (pa, pb)}, {"m": (a, b)})["m"][0] is pa  # nothing beyond
    assert grown[0].shape == (3, 2) and torch.equal(grown[0][:1], a)
    assert 0 < grown[0][1:].abs().max() <= 2 ** -0.5  # peft's lora_A bound: 1 / sqrt(in)
    torch.testing.assert_close(grown[1] @ grown[0], b @ a)  # zero B columns: same product
    assert torch.equal(fresh_rows({"m": (a, b)}, 3, seed=1)["m"][0], grown[0])  # seeded


def test_zeropad_under_partial_participation_keeps_ranks_and_grows_newcomers():
    """Ranks 1 and 2 (scaling 2); round 1 only the rank-1 client answers, round 2 only the
    rank-2 one, round 3 only the rank-1 one."""
    grid = FakeGrid({1: 0, 2: 1})
    strategy = ZeroPad(SETUP, MODULES, local_steps=1, ranks=[1, 2], alpha_ratio=2.0)
    msgs = by_rank(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    low = adapter(1, 31)
    g1, _ = strategy.aggregate_train(1, [reply(msgs[1], low, 1.0)])

    # round 2: the rank-2 client gets the rank-1 global grown by a fresh component
    msgs = by_rank(strategy.configure_train(2, g1, ConfigRecord(), grid))
    down = split_factors(msgs[2].content["arrays"].to_torch_state_dict())
    for module, (a, b) in down.items():
        assert a.shape[0] == 2 and b.shape[1] == 2
        torch.testing.assert_close(a[:1].float(), low[module + LORA_A].half().float())
        assert 0 < a[1].abs().max() <= MODULES[module][1] ** -0.5
        assert torch.count_nonzero(b[:, 1]) == 0
    high = adapter(2, 32)
    g2, _ = strategy.aggregate_train(2, [reply(msgs[2], high, 1.0)])
    assert strategy.round_log[2].accepted == 1

    # round 3: the rank-1 client alone; the global keeps rank 2 and the second component
    msgs = by_rank(strategy.configure_train(3, g2, ConfigRecord(), grid))
    low3 = adapter(1, 33)
    g3, _ = strategy.aggregate_train(3, [reply(msgs[1], low3, 1.0)])
    before, after = split_factors(g2.to_torch_state_dict()), split_factors(
        g3.to_torch_state_dict())
    for module, (a, b) in after.items():
        torch.testing.assert_close(a, torch.cat([2.0 * low3[module + LORA_A],
                                                 before[module][0][1:]]))
        torch.testing.assert_close(b, torch.cat([low3[module + LORA_B],
                                                 before[module][1][:, 1:]], dim=1))
    assert strategy.global_adapter(g3)[1:] == (2, 2.0)


# ---------------------------------------------------------------------------------------
# FlexLoRA


def test_factors_for_client_is_the_best_rank_r_approximation():
    # Prepare: a rank-4 global update on (6, 5) and (3, 5) modules, in float64
    global_factors = random_update(4, 1.0, 1.0, seed=7, dtype=torch.float64).factors
    r, scaling = 2, 2.0

    # Execute
    mine = factors_for_client(global_factors, r, scaling)

    # Assert: s · B' @ A' is the dense SVD's best rank-2 approximation of B @ A
    for module, (n_out, n_in) in MODULES.items():
        a_g, b_g = global_factors[module]
        a_r, b_r = mine[module]
        assert a_r.shape == (r, n_in) and b_r.shape == (n_out, r)
        torch.testing.assert_close(scaling * (b_r @ a_r), dense_best_rank_k(b_g @ a_g, r),
                                   rtol=1e-6, atol=1e-6)


def test_factors_for_client_zero_pads_a_global_of_lower_rank():
    # Prepare: a rank-2 global update sent to a rank-4 client with scaling 0.5
    global_factors = random_update(2, 1.0, 1.0, seed=8, dtype=torch.float64).factors
    r, scaling = 4, 0.5

    # Execute
    mine = factors_for_client(global_factors, r, scaling)

    # Assert: shapes of rank 4, the two extra rank-1 terms zero, the product exact
    for module, (n_out, n_in) in MODULES.items():
        a_g, b_g = global_factors[module]
        a_r, b_r = mine[module]
        assert a_r.shape == (r, n_in) and b_r.shape == (n_out, r)
        assert torch.count_nonzero(a_r[2:]) == 0 and torch.count_nonzero(b_r[:, 2:]) == 0
        torch.testing.assert_close(scaling * (b_r @ a_r), b_g @ a_g, rtol=1e-6, atol=1e-6)


def test_flexlora_sends_per_client_ranks_and_replaces_the_global():
    # Prepare: clients of ranks 2 and 4, scaling 2; round 1 from the base
    grid = FakeGrid({1: 0, 2: 1})
    strategy = FlexLoRA(SETUP, MODULES, local_steps=1, ranks=[2, 4], alpha_ratio=2.0)
    msgs1 = by_rank(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    round1 = {2: (adapter(2, 31), 10.0), 4: (adapter(4, 32), 30.0)}
    round2 = {2: (adapter(2, 41), 5.0), 4: (adapter(4, 42), 15.0)}
    updates1 = [LoraUpdate(split_factors(s), 2.0, n) for s, n in round1.values()]
    updates2 = [LoraUpdate(split_factors(s), 2.0, n) for s, n in round2.values()]

    # Execute: two rounds
    arrays1, _ = strategy.aggregate_train(1, [reply(msgs1[r], s, n)
                                              for r, (s, n) in round1.items()])
    msgs2 = by_rank(strategy.configure_train(2, arrays1, ConfigRecord(), grid))
    arrays2, _ = strategy.aggregate_train(2, [reply(msgs2[r], s, n)
                                              for r, (s, n) in round2.items()])

    # Assert: round 2's downloads have each client's rank, start its LoRA ("init") and
    # give s·B@A = the best rank-r approximation of round 1's global (fp16 on the wire)
    assert {m.content["config"]["global-mode"] for m in msgs2.values()} == {"init"}
    for r, msg in msgs2.items():
        down = msg.content["arrays"].to_torch_state_dict()
        for module, (n_out, n_in) in MODULES.items():
            a, b = down[module + LORA_A], down[module + LORA_B]
            assert a.shape == (r, n_in) and b.shape == (n_out, r) and a.dtype == torch.float16
            torch.testing.assert_close(2.0 * (b.float() @ a.float()),
                                       dense_best_rank_k(exact_delta(updates1, module), r),
                                       rtol=1e-2, atol=1e-2)
    # ... and the global after round 2 is round 2's update only, not round 1's plus it
    state, rank, alpha = strategy.global_adapter(arrays2)
    assert (rank, alpha) == (6, 6.0)
    for module in MODULES:
        product = state[module + LORA_B] @ state[module + LORA_A]
        torch.testing.assert_close(product, exact_delta(updates2, module), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# FFA-LoRA


def test_average_b_is_exact_for_a_shared_a():
    # Prepare: three clients with one shared A per module, their own B, scaling 2
    shared_a = {m: a for m, (a, _) in random_update(2, 2.0, 1.0, seed=50).factors.items()}
    updates = [LoraUpdate({m: (shared_a[m], b) for m, (_, b) in
                           random_update(2, 2.0, 1.0, seed=s).factors.items()}, 2.0, n)
               for s, n in ((51, 1.0), (52, 2.0), (53, 5.0))]
    ps = [1 / 8, 2 / 8, 5 / 8]

    # Execute
    b_avg = average_b(updates)

    # Assert: (Σ p B_k) @ A = Σ p B_k @ A, and times s it is the exact update
    for module in MODULES:
        a = shared_a[module]
        by_hand = sum(p * (u.factors[module][1] @ a) for p, u in zip(ps, updates))
        torch.testing.assert_close(b_avg[module], sum(p * u.factors[module][1]
                                                      for p, u in zip(ps, updates)))
        torch.testing.assert_close(b_avg[module] @ a, by_hand, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(2.0 * (b_avg[module] @ a), exact_delta(updates, module),
                                   rtol=1e-5, atol=1e-5)


def b_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(LORA_B)}


def test_ffa_freezes_a_accepts_b_only_and_averages_b():
    # Prepare: three rank-2 clients starting from the server's seeded adapter
    grid = FakeGrid({1: 0, 2: 1, 3: 2})
    strategy = FFALoRA(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=2.0,
                       min_available_nodes=3)
    initial = adapter(2, 60)
    msgs = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(1, ArrayRecord(initial), ConfigRecord(), grid)}
    full = {1: adapter(2, 61), 2: adapter(2, 62), 3: adapter(2, 63)}

    # Execute: clients 1 and 2 send B only; client 3 sends A as well
    arrays, _ = strategy.aggregate_train(1, [reply(msgs[1], b_only(full[1]), 1.0),
                                             reply(msgs[2], b_only(full[2]), 3.0),
                                             reply(msgs[3], full[3], 100.0)])

    # Assert: the orders freeze A and carry the initial A (fp16 on the wire)
    for msg in msgs.values():
        assert msg.content["config"]["train-lora-a"] is False
        down = msg.content["arrays"].to_torch_state_dict()
        for module in MODULES:
            torch.testing.assert_close(down[module + LORA_A], initial[module + LORA_A].half())
    log = strategy.round_log[1]
    assert log.accepted == 2
    assert log.clients["partition-0"].status == "ok"
    assert "unexpected" in log.clients["partition-2"].status
    assert LORA_A.strip(".") in log.clients["partition-2"].status
    # ... the aggregate is the server's A (as clients got it) with the weighted mean of B
    got = arrays.to_torch_state_dict()
    assert set(got) == set(initial)
    for module in MODULES:
        a_wire = initial[module + LORA_A].half().float()
        assert not torch.equal(a_wire, initial[module + LORA_A])  # the rounding is visible
        torch.testing.assert_close(got[module + LORA_A], a_wire, rtol=0, atol=0)
        torch.testing.assert_close(got[module + LORA_B], 0.25 * full[1][module + LORA_B]
                                   + 0.75 * full[2][module + LORA_B])
    # ... and a B-only upload is smaller than the full adapter of the same rank
    up_b = log.clients["partition-0"].bytes_up
    up_full = log.clients["partition-2"].bytes_up
    assert up_b == ArrayRecord(b_only(full[1])).count_bytes()
    assert up_b < up_full
    a_bytes = sum(4 * 2 * n_in for _, n_in in MODULES.values())  # float32 A, rank 2
    assert up_full - up_b >= a_bytes
