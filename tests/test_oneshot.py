"""One-shot aggregation (OneShot: one round of the whole budget, stacked or averaged) and
folding a late client into its result; checked against the exact stack / average."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from strategies.late_math import fold_in, fold_in_average
from strategies.lora_math import (
    LORA_A,
    LORA_B,
    LoraUpdate,
    exact_delta,
    fedavg_factors,
    split_factors,
    stack_factors,
)
from strategies.oneshot import OneShot
from tests.test_baselines import by_rank, random_update
from tests.test_strategies import (  # noqa: F401  (task_identity is an autouse fixture)
    MODULES,
    SETUP,
    FakeGrid,
    adapter,
    reply,
    task_identity,
)


def oneshot_round(combine: str, ranks: list[int], weights: dict[int, float]):
    """One-shot strategy with the budget of 3 rounds of 5 local steps, run for its one round
    over one client per rank: (strategy, rounds, messages, arrays, metrics, updates);
    lora_alpha = 2·r, so every client has scaling 2."""
    grid = FakeGrid({i + 1: i for i in range(len(ranks))})
    strategy = OneShot(SETUP, MODULES, local_steps=5, ranks=ranks, alpha_ratio=2.0,
                       min_available_nodes=len(ranks), combine=combine, budget_rounds=3)
    rounds = strategy.num_rounds(3)
    server_state = ArrayRecord(adapter(2, 69))  # whatever the server holds, none is sent
    msgs = by_rank(strategy.configure_train(1, server_state, ConfigRecord(), grid))
    states = {r: adapter(r, 70 + r) for r in msgs}
    arrays, metrics = strategy.aggregate_train(1, [reply(msgs[r], states[r], weights[r])
                                                   for r in msgs])
    updates = [LoraUpdate(split_factors(states[r]), 2.0, weights[r]) for r in msgs]
    return strategy, rounds, msgs, arrays, metrics, updates


def test_oneshot_runs_one_round_of_the_whole_budget_and_stacks_exactly():
    # Prepare / Execute: K = 3 clients of ranks 1, 2, 3, weights 2, 3, 5
    strategy, rounds, msgs, arrays, metrics, updates = oneshot_round(
        "stack", [1, 2, 3], {1: 2.0, 2: 3.0, 3: 5.0})

    # Assert: one round of 3 × 5 local steps, from the base, nothing downloaded
    assert rounds == 1
    assert len(msgs) == 3
    assert metrics["budget-steps"] == 15
    for msg in msgs.values():
        assert msg.content["config"]["local-steps"] == 15
        assert msg.content["config"]["global-mode"] == "none"
        assert len(msg.content["arrays"]) == 0
    # ... the aggregate is Σ p_k s_k B_k A_k, a rank-6 peft LoRA with scaling 1
    state, rank, alpha = strategy.global_adapter(arrays)
    assert (rank, alpha) == (6, 6.0)
    for module in MODULES:
        torch.testing.assert_close(state[module + LORA_B] @ state[module + LORA_A],
                                   exact_delta(updates, module), rtol=1e-5, atol=1e-5)
    assert strategy.export_metadata() == {"strategy": "oneshot", "combine": "stack",
                                          "total-weight": 10.0, "scaling": 1.0}


def test_oneshot_average_averages_factors_and_keeps_the_clients_scaling():
    # Prepare / Execute: two rank-2 clients, weights 1 and 3
    strategy = OneShot(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=2.0,
                       combine="average")
    grid = FakeGrid({1: 0, 2: 1})
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    states = [adapter(2, 80), adapter(2, 81)]
    arrays, _ = strategy.aggregate_train(1, [reply(m, s, n) for m, s, n in
                                             zip(msgs, states, (1.0, 3.0))])

    # Assert
    state, rank, alpha = strategy.global_adapter(arrays)
    assert (rank, alpha) == (2, 4.0)
    for key in states[0]:
        torch.testing.assert_close(state[key], 0.25 * states[0][key] + 0.75 * states[1][key])
    assert strategy.export_metadata() == {"strategy": "oneshot", "combine": "average",
                                          "total-weight": 4.0, "scaling": 2.0}


def test_oneshot_average_refuses_mixed_ranks():
    with pytest.raises(ValueError, match=r"strategy\.combine='average'.*\[1, 2\]"):
        OneShot(SETUP, MODULES, local_steps=1, ranks=[1, 2], alpha_ratio=1.0, combine="average")


def test_oneshot_refuses_an_unknown_combine():
    with pytest.raises(ValueError, match=r"strategy\.combine='bogus'.*stack.*average"):
        OneShot(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=1.0, combine="bogus")


@pytest.mark.parametrize("budget", [0, True, 2.0])
def test_oneshot_refuses_a_budget_that_is_not_a_positive_int(budget):
    with pytest.raises(ValueError, match=r"strategy\.budget_rounds=.*an int >= 1"):
        OneShot(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=1.0, budget_rounds=budget)


# ---------------------------------------------------------------------------------------
# Late clients: fold_in / fold_in_average


def test_fold_in_equals_stacking_everyone_at_once():
    # Prepare: K = 3 clients with different ranks, scalings and weights; the third is late
    updates = [random_update(1, 2.0, 10.0, seed=90), random_update(2, 0.5, 30.0, seed=91),
               random_update(3, 4.0, 20.0, seed=92)]
    early = stack_factors(updates[:2])

    # Execute
    folded = fold_in(early, 40.0, updates[2])

    # Assert: same dense update as all three at once, and the same stacked factors
    at_once = stack_factors(updates)
    for module in MODULES:
        a_f, b_f = folded[module]
        torch.testing.assert_close(b_f @ a_f, exact_delta(updates, module), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a_f, at_once[module][0])
        torch.testing.assert_close(b_f, at_once[module][1])


def test_fold_in_twice_equals_stacking_everyone_at_once():
    # Prepare: four clients, the last two late, folded one after the other
    updates = [random_update(r, s, w, seed=95 + i) for i, (r, s, w) in
               enumerate(((2, 1.0, 5.0), (1, 2.0, 1.0), (3, 1.0, 4.0), (2, 3.0, 10.0)))]

    # Execute
    folded = fold_in(fold_in(stack_factors(updates[:2]), 6.0, updates[2]), 10.0, updates[3])

    # Assert
    for module in MODULES:
        a_f, b_f = folded[module]
        torch.testing.assert_close(b_f @ a_f, exact_delta(updates, module), rtol=1e-5, atol=1e-5)


def test_fold_in_average_equals_averaging_everyone_at_once():
    # Prepare: three rank-2 clients of one scaling; the third is late
    updates = [random_update(2, 2.0, w, seed=100 + i) for i, w in enumerate((1.0, 3.0, 2.0))]
    early = fedavg_factors(updates[:2])

    # Execute
    folded = fold_in_average(early, 4.0, updates[2])

    # Assert: same factors as averaging all three (p = 1/6, 3/6, 2/6)
    at_once = fedavg_factors(updates)
    for module in MODULES:
        by_hand = [sum(p * u.factors[module][i] for p, u in zip((1 / 6, 3 / 6, 2 / 6), updates))
                   for i in (0, 1)]
        torch.testing.assert_close(folded[module][0], at_once[module][0])
        torch.testing.assert_close(folded[module][1], at_once[module][1])
        torch.testing.assert_close(folded[module][0], by_hand[0])
        torch.testing.assert_close(folded[module][1], by_hand[1])
