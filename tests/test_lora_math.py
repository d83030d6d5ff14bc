"""Tests of the pure LoRA aggregation math (strategies/lora_math.py).

Expectations are hand-computed, computed densely with torch, or taken from peft's own
`add_weighted_adapter(combination_type="cat")`, which stacks adapters the way FLoRA does.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn

from strategies.lora_math import (
    LoraUpdate,
    exact_delta,
    fedavg_factors,
    fedavg_noise,
    join_factors,
    normalized_weights,
    split_factors,
    stack_factors,
)

MODULE_SHAPES = {  # peft module key -> (out, in)
    "base_model.model.model.layers.0.self_attn.q_proj": (12, 10),
    "base_model.model.model.layers.0.self_attn.v_proj": (6, 10),
}


def random_update(r: int, lora_alpha: float, weight: float, seed: int,
                  dtype: torch.dtype = torch.float32) -> LoraUpdate:
    """A rank-r adapter over MODULE_SHAPES with random non-zero A and B."""
    gen = torch.Generator().manual_seed(seed)
    factors = {
        module: (torch.randn(r, n_in, generator=gen, dtype=dtype),  # lora_A (r, in)
                 torch.randn(n_out, r, generator=gen, dtype=dtype))  # lora_B (out, r)
        for module, (n_out, n_in) in MODULE_SHAPES.items()
    }
    return LoraUpdate(factors=factors, scaling=lora_alpha / r, weight=weight)


# ---------------------------------------------------------------------------------------
# FLoRA stacking


def test_stack_factors_equals_weighted_sum_of_scaled_products():
    # Prepare: three clients with ranks 2, 3, 5, different lora_alpha and example counts
    updates = [random_update(2, 4.0, 10.0, seed=1),
               random_update(3, 16.0, 30.0, seed=2),
               random_update(5, 5.0, 60.0, seed=3)]
    ps = [10 / 100, 30 / 100, 60 / 100]

    # Execute
    stacked = stack_factors(updates)

    # Assert: B_s @ A_s = Σ p_k s_k B_k A_k, computed by hand
    assert set(stacked) == set(MODULE_SHAPES)
    for module, (n_out, n_in) in MODULE_SHAPES.items():
        a_s, b_s = stacked[module]
        assert a_s.shape == (2 + 3 + 5, n_in)
        assert b_s.shape == (n_out, 2 + 3 + 5)
        expected = torch.zeros(n_out, n_in)
        for p, u in zip(ps, updates):
            a, b = u.factors[module]
            expected += p * u.scaling * (b @ a)
        torch.testing.assert_close(b_s @ a_s, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exact_delta(updates, module), expected, rtol=1e-5, atol=1e-5)


class TwoProjections(nn.Module):
    """Smallest model with the q_proj / v_proj names peft targets."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(10, 12, bias=False)
        self.v_proj = nn.Linear(10, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x).sum() + self.v_proj(x).sum()


def test_stack_factors_matches_peft_cat_combination():
    # Prepare: a peft model holding three adapters of different r / lora_alpha, random A and B
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj"]
    adapters = {"c0": (2, 4), "c1": (3, 12), "c2": (5, 5)}  # name -> (r, lora_alpha)
    first, *rest = adapters
    model = get_peft_model(TwoProjections(), LoraConfig(r=adapters[first][0],
                           lora_alpha=adapters[first][1], target_modules=targets),
                           adapter_name=first)
    for name in rest:
        r, alpha = adapters[name]
        model.add_adapter(name, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    with torch.no_grad():
        for layer in (model.base_model.model.q_proj, model.base_model.model.v_proj):
            for name in adapters:
                layer.lora_A[name].weight.normal_()
                layer.lora_B[name].weight.normal_()  # peft starts B at zero: make it non-zero
    weights = [20.0, 30.0, 50.0]
    ps = normalized_weights(weights)
    updates = [LoraUpdate(factors=split_factors(get_peft_model_state_dict(model, adapter_name=n)),
                          scaling=adapters[n][1] / adapters[n][0], weight=w)
               for n, w in zip(adapters, weights)]

    # Execute: peft's oracle and ours
    model.add_weighted_adapter(adapters=list(adapters), weights=ps, adapter_name="cat",
                               combination_type="cat")
    ours = stack_factors(updates)

    # Assert: peft's "cat" adapter has r = lora_alpha = Σr, hence scaling 1, and the same
    # factors and delta as our stacking
    assert model.peft_config["cat"].r == 10
    cat_state = split_factors(get_peft_model_state_dict(model, adapter_name="cat"))
    assert set(cat_state) == set(ours) == {"base_model.model.q_proj", "base_model.model.v_proj"}
    for module, (a_s, b_s) in ours.items():
        layer = model.base_model.model.get_submodule(module.removeprefix("base_model.model."))
        scaling_cat = layer.scaling["cat"]
        assert scaling_cat == pytest.approx(1.0)
        a_cat, b_cat = cat_state[module]
        torch.testing.assert_close(a_s, a_cat, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b_s, b_cat)
        delta_cat = layer.get_delta_weight("cat")  # scaling_cat * B_cat @ A_cat, by peft
        torch.testing.assert_close(delta_cat, scaling_cat * (b_cat @ a_cat))
        torch.testing.assert_close(b_s @ a_s, delta_cat, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# FedIT


def hand_fedit_updates() -> list[LoraUpdate]:
    """Two rank-1 clients on one 2x2 module, scaling 2, weights 1 and 3 (p = 1/4, 3/4)."""
    m = "m"
    return [
        LoraUpdate({m: (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]))}, 2.0, 1.0),
        LoraUpdate({m: (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]]))}, 2.0, 3.0),
    ]


def test_fedavg_factors_hand_computed():
    # Prepare
    updates = hand_fedit_updates()

    # Execute
    avg = fedavg_factors(updates)

    # Assert: A = 1/4 [1, 0] + 3/4 [0, 1], B = 1/4 [1; 0] + 3/4 [0; 1]
    a, b = avg["m"]
    torch.testing.assert_close(a, torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(b, torch.tensor([[0.25], [0.75]]))


def test_fedavg_noise_hand_computed():
    # Prepare: s (ΣpB)(ΣpA) = 2 [[1/16, 3/16], [3/16, 9/16]] = [[1/8, 3/8], [3/8, 9/8]]
    # and Σ p s B A = [[1/2, 0], [0, 3/2]]: error [[-3/8, 3/8], [3/8, -3/8]], norm 3/4;
    # reference norm √(1/4 + 9/4) = √10 / 2
    updates = hand_fedit_updates()
    expected = (3 / 4) / (math.sqrt(10) / 2)

    # Execute
    noise = fedavg_noise(updates)

    # Assert
    assert noise == pytest.approx(expected, rel=1e-6)


def test_fedavg_noise_sums_over_modules_before_the_ratio():
    # Prepare: add a module "n" on which both clients agree (error 0, exact 2·[[1,1],[1,1]],
    # squared norm 16) to the hand example (squared error 9/16, squared reference 10/4)
    updates = hand_fedit_updates()
    agree = (torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [1.0]]))
    updates = [LoraUpdate({**u.factors, "n": agree}, u.scaling, u.weight) for u in updates]
    expected = math.sqrt((9 / 16) / (10 / 4 + 16))

    # Execute
    noise = fedavg_noise(updates)

    # Assert
    assert noise == pytest.approx(expected, rel=1e-6)


def test_fedavg_noise_zero_for_one_client_and_for_identical_clients():
    # Prepare
    one = random_update(4, 8.0, 7.0, seed=5)
    twin = random_update(4, 8.0, 3.0, seed=5)

    # Execute
    single = fedavg_noise([one])
    identical = fedavg_noise([one, twin])
    differing = fedavg_noise([one, random_update(4, 8.0, 3.0, seed=6)])

    # Assert
    assert single == pytest.approx(0.0, abs=1e-6)
    assert identical == pytest.approx(0.0, abs=1e-6)
    assert differing > 0.1  # the check above can tell a disagreement apart


def test_fedavg_factors_rejects_mixed_ranks():
    # Prepare
    updates = [random_update(2, 4.0, 1.0, seed=1), random_update(3, 6.0, 1.0, seed=2)]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"ranks \[2, 3\]"):
        fedavg_factors(updates)


# ---------------------------------------------------------------------------------------
# State dict plumbing


def test_split_join_round_trip():
    # Prepare
    state = join_factors(random_update(3, 6.0, 1.0, seed=0).factors)

    # Execute
    factors = split_factors(state)
    again = join_factors(factors)

    # Assert
    assert set(factors) == set(MODULE_SHAPES)
    for module, (n_out, n_in) in MODULE_SHAPES.items():
        assert factors[module][0] is state[module + ".lora_A.weight"]
        assert factors[module][1] is state[module + ".lora_B.weight"]
        assert factors[module][0].shape == (3, n_in) and factors[module][1].shape == (n_out, 3)
    assert set(again) == set(state)
    assert all(again[k] is state[k] for k in state)


@pytest.mark.parametrize("drop", ["lora_B", "lora_A"])
def test_split_factors_names_the_module_missing_a_factor(drop):
    # Prepare
    state = join_factors(random_update(2, 2.0, 1.0, seed=0).factors)
    module = "base_model.model.model.layers.0.self_attn.v_proj"
    del state[f"{module}.{drop}.weight"]

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"'{module}' lacks '{drop}\.weight'"):
        split_factors(state)


def test_split_factors_names_the_module_whose_ranks_do_not_chain():
    # Prepare
    state = join_factors(random_update(2, 2.0, 1.0, seed=0).factors)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    state[module + ".lora_B.weight"] = torch.zeros(12, 3)

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"'{module}' has lora_A \(2, 10\) and lora_B \(12, 3\)"):
        split_factors(state)


def test_normalized_weights():
    # Execute / Assert
    assert normalized_weights([1, 3]) == [0.25, 0.75]
    assert normalized_weights([5.0]) == [1.0]
    with pytest.raises(ValueError, match="positive sum"):
        normalized_weights([])
    with pytest.raises(ValueError, match="positive sum"):
        normalized_weights([0.0, 0.0])
