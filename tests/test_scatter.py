"""Tests of scattering pruned clients' LoRA factors to full shape and slicing them back
(strategies/scatter.py).

The expectation for aggregation is built independently of `scatter_factors`: each client's
dense pruned update s_k B_k A_k is written into a zero (out, in) matrix at
[kept_out][:, kept_in], and the weighted sum of those is compared with FLoRA stacking of
the scattered factors.
"""

from __future__ import annotations

import pytest
import torch

from strategies.lora_math import Factors, LoraUpdate, normalized_weights, stack_factors
from strategies.scatter import Kept, scatter_factors, slice_factors

Q = "base_model.model.model.layers.0.self_attn.q_proj"
O = "base_model.model.model.layers.0.self_attn.o_proj"
UP = "base_model.model.model.layers.0.mlp.up_proj"
FULL_SHAPES = {Q: (12, 10), O: (10, 12), UP: (16, 10)}  # (out, in)


def pruned_factors(r: int, kept: Kept, seed: int, drop: tuple[str, ...] = ()) -> Factors:
    """Random rank-r factors sized to the kept units of each module (absent: dropped)."""
    gen = torch.Generator().manual_seed(seed)
    factors: Factors = {}
    for module, (n_out, n_in) in FULL_SHAPES.items():
        if module in drop:
            continue
        kept_out, kept_in = kept.get(module, (None, None))
        out_kept = n_out if kept_out is None else kept_out.numel()
        in_kept = n_in if kept_in is None else kept_in.numel()
        factors[module] = (torch.randn(r, in_kept, generator=gen, dtype=torch.float64),  # A
                           torch.randn(out_kept, r, generator=gen, dtype=torch.float64))  # B
    return factors


def dense_full_update(factors: Factors, kept: Kept, scaling: float, module: str) -> torch.Tensor:
    """s · B @ A of a pruned client, placed into a zero (out, in) matrix at its kept units."""
    n_out, n_in = FULL_SHAPES[module]
    full = torch.zeros(n_out, n_in, dtype=torch.float64)
    if module not in factors:  # dropped module: zero update
        return full
    a, b = factors[module]
    kept_out, kept_in = kept.get(module, (None, None))
    rows = torch.arange(n_out) if kept_out is None else kept_out
    cols = torch.arange(n_in) if kept_in is None else kept_in
    full[rows[:, None], cols[None, :]] = scaling * (b @ a)  # (out_kept, r) @ (r, in_kept)
    return full


def idx(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# Three clients: heterogeneous ranks, different kept sets (unsorted indices included), one
# unpruned, one with a whole module (the MLP block) dropped.
CLIENTS: list[tuple[int, float, float, Kept, tuple[str, ...]]] = [  # r, alpha, weight, kept, drop
    (4, 8.0, 30.0, {Q: (idx(0, 1, 2, 3, 8, 9, 10, 11), None),  # two of three heads kept
                    O: (None, idx(0, 1, 2, 3, 8, 9, 10, 11)),
                    UP: (idx(5, 1, 14, 7, 2, 9), None)}, ()),
    (8, 16.0, 50.0, {}, ()),  # unpruned
    (2, 4.0, 20.0, {Q: (idx(4, 5, 6, 7), None), O: (None, idx(4, 5, 6, 7)),
                    UP: (idx(), None)}, (UP,)),  # MLP dropped: no factors, empty kept
]


def test_scatter_then_stack_equals_the_weighted_sum_of_full_shape_updates():
    clients = [(pruned_factors(r, kept, seed=i, drop=drop), alpha / r, w, kept)
               for i, (r, alpha, w, kept, drop) in enumerate(CLIENTS)]
    updates = [LoraUpdate(scatter_factors(f, kept, FULL_SHAPES), s, w)
               for f, s, w, kept in clients]

    stacked = stack_factors(updates)

    ps = normalized_weights([w for _, _, w, _ in clients])
    for module in FULL_SHAPES:
        expected = sum(p * dense_full_update(f, kept, s, module)
                       for p, (f, s, _, kept) in zip(ps, clients))
        a_s, b_s = stacked[module]
        assert a_s.shape == (4 + 8 + 2, FULL_SHAPES[module][1])
        # stack_factors computes in float32: (out, Σr) @ (Σr, in) -> (out, in)
        torch.testing.assert_close(b_s @ a_s, expected.float(), rtol=1e-5, atol=1e-5)


def test_scattered_factors_are_zero_outside_the_kept_units():
    kept = {Q: (idx(1, 3), idx(0, 2, 4)), O: (None, None), UP: (idx(), idx())}
    factors = pruned_factors(3, {**kept, O: (None, None)}, seed=0, drop=(UP,))

    full = scatter_factors(factors, kept, FULL_SHAPES)

    a, b = full[Q]
    assert a.shape == (3, 10) and b.shape == (12, 3)
    torch.testing.assert_close(a[:, [0, 2, 4]], factors[Q][0])
    torch.testing.assert_close(b[[1, 3]], factors[Q][1])
    assert not a[:, [1, 3, 5, 6, 7, 8, 9]].any()
    assert not b[[0, 2, 4, 5, 6, 7, 8, 9, 10, 11]].any()
    a_up, b_up = full[UP]  # dropped: zero factors of the client's rank
    assert a_up.shape == (3, 10) and b_up.shape == (16, 3)
    assert not a_up.any() and not b_up.any()


def test_unpruned_client_passes_through_unchanged():
    factors = pruned_factors(8, {}, seed=1)

    full = scatter_factors(factors, {}, FULL_SHAPES)

    for module, (a, b) in factors.items():
        assert full[module][0] is a and full[module][1] is b


def test_slice_undoes_scatter():
    for i, (r, _, _, kept, drop) in enumerate(CLIENTS):
        factors = pruned_factors(r, kept, seed=10 + i, drop=drop)

        back = slice_factors(scatter_factors(factors, kept, FULL_SHAPES), kept)

        assert set(back) == set(factors)
        for module, (a, b) in factors.items():
            torch.testing.assert_close(back[module][0], a)
            torch.testing.assert_close(back[module][1], b)


def test_slice_of_a_global_update_is_the_kept_block_of_its_product():
    gen = torch.Generator().manual_seed(3)
    global_factors = {m: (torch.randn(5, n_in, generator=gen, dtype=torch.float64),  # (R, in)
                          torch.randn(n_out, 5, generator=gen, dtype=torch.float64))  # (out, R)
                      for m, (n_out, n_in) in FULL_SHAPES.items()}
    kept = CLIENTS[0][3]

    sliced = slice_factors(global_factors, kept)

    for module, (kept_out, kept_in) in kept.items():
        a, b = global_factors[module]
        dense = b @ a  # (out, R) @ (R, in) -> (out, in)
        rows = torch.arange(dense.shape[0]) if kept_out is None else kept_out
        cols = torch.arange(dense.shape[1]) if kept_in is None else kept_in
        a_k, b_k = sliced[module]
        torch.testing.assert_close(b_k @ a_k, dense[rows[:, None], cols[None, :]])


@pytest.mark.parametrize(("kept_q", "message"), [
    ((idx(0, 1, 12), None), r"q_proj': kept out indices span \[0, 12\]; allowed: 0 <= i < 12"),
    ((idx(-1, 0, 1), None), r"q_proj': kept out indices span \[-1, 1\]"),
    ((idx(0, 1, 1), None), r"q_proj': kept out indices contain duplicates"),
    ((idx(0, 1), None), r"q_proj': 2 kept out indices but the factor has 3 out units"),
    ((idx(0, 1, 2), idx(0, 1)), r"q_proj': 2 kept in indices but the factor has 10 in units"),
    ((torch.tensor([0.0, 1.0, 2.0]), None), r"q_proj': kept out indices must be a 1-D integer"),
    ((idx(0, 1, 2).reshape(3, 1), None), r"q_proj': kept out indices must be a 1-D integer"),
    ((None, None), r"q_proj': out is not pruned \(kept None\) but the factor has 3 units"),
])
def test_bad_kept_indices_are_refused_naming_the_module(kept_q, message):
    factors = {Q: (torch.randn(2, 10), torch.randn(3, 2))}  # a client keeping 3 rows of q_proj

    with pytest.raises(ValueError, match=message):
        scatter_factors(factors, {Q: kept_q}, FULL_SHAPES)


def test_slice_refuses_bad_indices_naming_the_module():
    factors = {Q: (torch.randn(2, 10), torch.randn(12, 2))}

    with pytest.raises(ValueError, match=r"q_proj': kept in indices span \[3, 10\]"):
        slice_factors(factors, {Q: (None, idx(3, 10))})
    with pytest.raises(ValueError, match=r"q_proj': kept out indices contain duplicates"):
        slice_factors(factors, {Q: (idx(2, 2), None)})
    with pytest.raises(ValueError, match=r"\['nope'\] that have no factors"):
        slice_factors(factors, {"nope": (idx(0), None)})


def test_unknown_modules_and_mixed_ranks_are_refused():
    with pytest.raises(ValueError, match=r"\['nope'\] are not among the model's target modules"):
        scatter_factors({"nope": (torch.randn(2, 3), torch.randn(4, 2))}, {}, FULL_SHAPES)
    mixed = {Q: (torch.randn(2, 10), torch.randn(12, 2)), O: (torch.randn(4, 12),
                                                             torch.randn(10, 4))}
    with pytest.raises(ValueError, match=r"share one rank r; got ranks \[2, 4\]"):
        scatter_factors(mixed, {}, FULL_SHAPES)
    with pytest.raises(ValueError, match="no LoRA factors at all"):
        scatter_factors({}, {}, FULL_SHAPES)
