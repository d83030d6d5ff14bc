"""Client-level differential privacy for LoRA updates of any mix of ranks.

Flower's DP wrappers clip the arrays a client sends, which only works when every client
sends the same shapes. Here the quantity that is clipped is what a client contributes to
the model, ΔW_k = s_k B_k A_k over all targeted modules, whatever its rank:

1. clip: ΔW_k ← ΔW_k · min(1, C / ‖ΔW_k‖_F), with ‖·‖ over all modules (computed from the
   factors, never forming ΔW_k: ‖BA‖² = tr((BᵀB)(AAᵀ)));
2. average with equal weights 1/K (so one client moves the sum by at most C/K) and add
   Gaussian noise N(0, (z·C/K)²) to every entry of the dense per-module sum;
3. re-factor by truncated SVD to the strategy's rank budget: post-processing, so it costs no
   privacy.

Privacy spent per round is accounted with Flower's RDP accountant (no amplification by
sampling is claimed). The trade-off: noise has the same scale for every entry of every
targeted matrix, so with few clients (small K) it dominates the update; DP pays off with
many clients per round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.lora_math import Factors, LoraUpdate, truncate_lowrank


def update_norm(update: LoraUpdate) -> float:
    """‖s · B A‖_F over all modules, from the factors: O((out + in) r²) per module."""
    total = 0.0
    for a, b in update.factors.values():
        a64, b64 = a.double(), b.double()
        total += float(torch.trace((b64.T @ b64) @ (a64 @ a64.T)))  # (r,r)@(r,r)
    return abs(update.scaling) * max(total, 0.0) ** 0.5


def clip_update(update: LoraUpdate, clip_norm: float) -> tuple[LoraUpdate, float]:
    """Scale the update's contribution to norm ≤ `clip_norm`; return it and its old norm."""
    if clip_norm <= 0:
        raise ValueError(f"dp.clip_norm={clip_norm}; allowed: > 0")
    norm = update_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    factors = {m: (a, b * factor) for m, (a, b) in update.factors.items()}
    return LoraUpdate(factors, update.scaling, update.weight), norm


def noise_std(noise_multiplier: float, clip_norm: float, num_clients: int) -> float:
    """Standard deviation of the noise on the mean of `num_clients` clipped updates."""
    return noise_multiplier * clip_norm / num_clients


def private_aggregate(updates: Sequence[LoraUpdate], clip_norm: float, noise_multiplier: float,
                      rank_budget: int, generator: torch.Generator
                      ) -> tuple[Factors, dict[str, float]]:
    """Clip each client, average with equal weights, add Gaussian noise, re-factor.

    Returns scaling-1 factors of rank `rank_budget` and figures to log (the noise std, the
    clients' pre-clip norms, how many were clipped).
    """
    k = len(updates)
    clipped, norms = zip(*(clip_update(u, clip_norm) for u in updates))
    std = noise_std(noise_multiplier, clip_norm, k)
    out: Factors = {}
    for module in updates[0].factors:
        mean = sum(u.scaling * (u.factors[module][1].double() @ u.factors[module][0].double())
                   for u in clipped) / k  # (out, r) @ (r, in) -> (out, in)
        noisy = mean + std * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
        u_, s, vh = torch.linalg.svd(noisy, full_matrices=False)
        a_full, b_full = torch.diag(s) @ vh, u_  # noisy = b_full @ a_full, rank min(out, in)
        a_r, b_r, _ = truncate_lowrank(a_full, b_full, rank_budget)
        out[module] = (a_r.float(), b_r.float())
    return out, {"dp-noise-std": std, "dp-max-norm": max(norms),
                 "dp-clipped": float(sum(n > clip_norm for n in norms))}


def make_accountant(dp: Mapping, population: int):  # -> flwr RdpAccountant
    """Flower's RDP accountant for client-level DP over `population` clients."""
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    for key in ("clip_norm", "noise_multiplier"):
        if not float(dp[key]) > 0:
            raise ValueError(f"dp.{key}={dp[key]}; allowed: > 0")
    if not 0 < float(dp["delta"]) < 1:
        raise ValueError(f"dp.delta={dp['delta']}; allowed: 0 < delta < 1")
    return RdpAccountant(PrivacyConfig(
        target_delta=float(dp["delta"]), population_size=int(population),
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))


def spend(accountant, noise_multiplier: float, num_clients: int, delta: float) -> float:
    """Compose one round's Gaussian release; return the total ε spent so far at `delta`."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    population = accountant.config.population_size
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier,
                                            sample_size=min(num_clients, population),
                                            population_size=population))
    return float(accountant.get_epsilon(delta))
