"""Differential privacy for heterogeneous-rank LoRA: clipping bounds each client's
contribution, the noise has the configured scale."""

from __future__ import annotations

import pytest
import torch

from strategies.dp import clip_update, noise_std, private_aggregate, update_norm
from strategies.lora_math import LoraUpdate

MODULES = {"m.q": (8, 6), "m.v": (5, 6)}


def update(r: int, seed: int, scale: float = 1.0, scaling: float = 2.0) -> LoraUpdate:
    gen = torch.Generator().manual_seed(seed)
    return LoraUpdate({m: (torch.randn(r, i, generator=gen), scale * torch.randn(o, r, generator=gen))
                       for m, (o, i) in MODULES.items()}, scaling=scaling, weight=1.0)


def dense_norm(u: LoraUpdate) -> float:
    return sum(float(((u.scaling * b.double() @ a.double()) ** 2).sum())
               for a, b in u.factors.values()) ** 0.5


def test_update_norm_equals_the_dense_frobenius_norm():
    u = update(3, 0)

    assert update_norm(u) == pytest.approx(dense_norm(u), rel=1e-9)


@pytest.mark.parametrize("r", [1, 2, 5])
def test_clipping_bounds_each_contribution_whatever_the_rank(r):
    big, small = update(r, 1, scale=10.0), update(r, 2, scale=1e-3)

    clipped_big, norm_big = clip_update(big, 1.0)
    clipped_small, norm_small = clip_update(small, 1.0)

    assert norm_big > 1.0 and dense_norm(clipped_big) == pytest.approx(1.0, rel=1e-6)
    assert norm_small < 1.0 and dense_norm(clipped_small) == pytest.approx(norm_small, rel=1e-9)
    direction = [(b @ a) for a, b in big.factors.values()]
    for (a, b), d in zip(clipped_big.factors.values(), direction):  # same direction, shorter
        torch.testing.assert_close((b @ a) * norm_big, d * 1.0, rtol=1e-4, atol=1e-4)


def test_noise_has_the_configured_scale():
    clients = [update(2, 10 + i, scale=0.0) for i in range(4)]  # zero updates: output = noise
    gen = torch.Generator().manual_seed(0)

    factors, info = private_aggregate(clients, clip_norm=2.0, noise_multiplier=1.5,
                                      rank_budget=6, generator=gen)

    expected = noise_std(1.5, 2.0, 4)
    assert info["dp-noise-std"] == pytest.approx(expected) == pytest.approx(0.75)
    noise = torch.cat([(b @ a).flatten() for a, b in factors.values()])
    assert noise.numel() == 8 * 6 + 5 * 6 and noise.std().item() == pytest.approx(expected, rel=0.2)
    assert abs(noise.mean().item()) < 3 * expected / noise.numel() ** 0.5


def test_without_noise_the_result_is_the_mean_of_clipped_updates():
    clients = [update(1, 20), update(3, 21, scale=5.0)]
    gen = torch.Generator().manual_seed(0)

    factors, info = private_aggregate(clients, clip_norm=1.0, noise_multiplier=1e-12,
                                      rank_budget=6, generator=gen)

    clipped = [clip_update(c, 1.0)[0] for c in clients]
    for m, (a, b) in factors.items():
        want = sum(c.scaling * c.factors[m][1] @ c.factors[m][0] for c in clipped) / 2
        torch.testing.assert_close(b @ a, want, rtol=1e-4, atol=1e-5)
    assert info["dp-clipped"] >= 1 and info["dp-max-norm"] > 1.0


def test_clip_norm_must_be_positive():
    with pytest.raises(ValueError, match="dp.clip_norm=0"):
        clip_update(update(1, 0), 0.0)
