"""Tests of the rank-budget re-compression (strategies/lora_math.py `truncate_lowrank`,
`truncate_factors`, `append_factors`) and `rank_of`, against a dense SVD (Eckart–Young).
"""

from __future__ import annotations

import math

import pytest
import torch

from strategies.lora_math import (
    append_factors,
    rank_of,
    truncate_factors,
    truncate_lowrank,
)
from tests.test_lora_math import MODULE_SHAPES, random_update


def dense_best_rank_k(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Eckart–Young by a dense SVD: (best rank-k approximation, relative error dropped)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k]  # (out, k) @ (k, in) -> (out, in)
    dropped = math.sqrt(float((s[k:] ** 2).sum()) / float((s**2).sum()))
    return best, dropped




# ---------------------------------------------------------------------------------------
# Low-rank truncation


def test_truncate_lowrank_is_exact_within_budget():
    # Prepare
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 10, generator=gen), torch.randn(12, 4, generator=gen)

    # Execute
    for budget in (4, 6):
        a_t, b_t, dropped = truncate_lowrank(a, b, budget)

        # Assert
        assert dropped == 0.0
        assert a_t.shape == (4, 10) and b_t.shape == (12, 4)
        torch.testing.assert_close(b_t @ a_t, b @ a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("budget", [1, 3, 5])
def test_truncate_lowrank_is_the_best_rank_k_approximation(budget):
    # Prepare: rank 7 factors in float64; the dense SVD of B @ A is the oracle
    gen = torch.Generator().manual_seed(budget)
    a = torch.randn(7, 20, generator=gen, dtype=torch.float64)
    b = torch.randn(15, 7, generator=gen, dtype=torch.float64)
    best, best_dropped = dense_best_rank_k(b @ a, budget)

    # Execute
    a_t, b_t, dropped = truncate_lowrank(a, b, budget)

    # Assert
    assert a_t.shape == (budget, 20)
    assert b_t.shape == (15, budget)
    assert a_t.dtype == b_t.dtype == torch.float64
    torch.testing.assert_close(b_t @ a_t, best, rtol=1e-5, atol=1e-5)
    assert dropped == pytest.approx(best_dropped, rel=1e-6)
    measured = float(torch.linalg.matrix_norm(b @ a - b_t @ a_t) / torch.linalg.matrix_norm(b @ a))
    assert dropped == pytest.approx(measured, rel=1e-6)


def test_truncate_lowrank_beats_random_rank_k_factorisations():
    # Prepare
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    b = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    k = 2
    full = b @ a

    # Execute
    a_t, b_t, _ = truncate_lowrank(a, b, k)
    ours = float(torch.linalg.matrix_norm(full - b_t @ a_t))
    others = []
    for _ in range(20):
        # a random rank-k subspace, fitted by least squares: the best it can do
        a_r = torch.randn(k, 16, generator=gen, dtype=torch.float64)
        b_r = full @ torch.linalg.pinv(a_r)  # (out, in) @ (in, k) -> (out, k)
        others.append(float(torch.linalg.matrix_norm(full - b_r @ a_r)))
    # and the naive truncation: keep the first k rows / columns of the factors
    others.append(float(torch.linalg.matrix_norm(full - b[:, :k] @ a[:k])))

    # Assert
    assert all(ours <= other + 1e-9 for other in others)


@pytest.mark.parametrize("n_out, n_in", [(32, 64), (64, 32)])
def test_truncate_lowrank_when_the_budget_exceeds_a_module_dimension(n_out, n_in):
    # Prepare: the tiny Llama's k_proj / v_proj are (32, 64); FLoRA's default budget is 64 and
    # two rounds of ranks [4, 8, 16, 8] stack to rank 72 > 64. B @ A then has rank ≤ 32 < 64,
    # so keeping 64 singular triplets loses nothing.
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(72, n_in, generator=gen, dtype=torch.float64)
    b = torch.randn(n_out, 72, generator=gen, dtype=torch.float64)

    # Execute
    a_t, b_t, dropped = truncate_lowrank(a, b, 64)

    # Assert
    assert a_t.shape[0] == b_t.shape[1] <= 64
    assert dropped == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(b_t @ a_t, b @ a)


def test_truncate_lowrank_of_zero_product():
    # Prepare: peft initialises lora_B to zero, so a global update may be exactly zero
    a = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    b = torch.zeros(6, 5)

    # Execute
    a_t, b_t, dropped = truncate_lowrank(a, b, 2)

    # Assert
    assert dropped == 0.0
    assert a_t.shape == (2, 8) and b_t.shape == (6, 2)
    torch.testing.assert_close(b_t @ a_t, torch.zeros(6, 8))


def test_append_then_truncate_keeps_the_sum_of_products():
    # Prepare: a running global update and one round's update, rank 2 each
    g = random_update(2, 2.0, 1.0, seed=10, dtype=torch.float64).factors
    d = random_update(2, 2.0, 1.0, seed=11, dtype=torch.float64).factors

    # Execute
    appended = append_factors(g, d)
    truncated, worst = truncate_factors(appended, budget=4)
    first = append_factors({}, d)

    # Assert
    for module, (n_out, n_in) in MODULE_SHAPES.items():
        expected = g[module][1] @ g[module][0] + d[module][1] @ d[module][0]
        a, b = appended[module]
        assert a.shape == (4, n_in) and b.shape == (n_out, 4)
        torch.testing.assert_close(b @ a, expected)
        a_t, b_t = truncated[module]
        torch.testing.assert_close(b_t @ a_t, expected)
        torch.testing.assert_close(first[module][1] @ first[module][0],
                                   d[module][1] @ d[module][0])
        assert first[module][0] is not d[module][0]  # a copy, not an alias
    assert worst == 0.0


def test_truncate_factors_reports_the_worst_module():
    # Prepare: one module of rank 3 (lossy under budget 1), one of rank 1 (exact)
    gen = torch.Generator().manual_seed(4)
    a3, b3 = (torch.randn(3, 7, generator=gen, dtype=torch.float64),
              torch.randn(5, 3, generator=gen, dtype=torch.float64))
    factors = {  # the lossy module first: the worst is not simply the last one
        "lossy": (a3, b3),
        "exact": (torch.randn(1, 7, generator=gen, dtype=torch.float64),
                  torch.randn(5, 1, generator=gen, dtype=torch.float64)),
    }
    _, expected = dense_best_rank_k(b3 @ a3, 1)

    # Execute
    _, worst = truncate_factors(factors, budget=1)

    # Assert
    assert expected > 0
    assert worst == pytest.approx(expected, rel=1e-6)


def test_rank_of_is_the_shared_rank_and_refuses_mixed_or_no_factors():
    # Prepare
    factors = random_update(3, 6.0, 1.0, seed=0).factors
    mixed = {**factors, "other": (torch.zeros(2, 4), torch.zeros(5, 2))}

    # Execute / Assert
    assert rank_of(factors) == 3
    with pytest.raises(ValueError, match=r"share one rank r; got ranks \[2, 3\]"):
        rank_of(mixed)
    with pytest.raises(ValueError, match="no LoRA factors at all"):
        rank_of({})
