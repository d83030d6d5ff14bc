"""The capped downlink's math: a returning client gets, instead of the exact global G_t,
the best rank-m correction of what it holds, and the part not sent waits for the next round.

The server knows what each client holds (H, the factors it last received and rebuilt) and
sends C = the best rank-m approximation of G_t − H (Eckart–Young, from the factors: never
the dense matrix). Client and server then compute H' = `next_global`(H, C, budget) with the
same function, so they agree bitwise; G_t − H' is the lag, and the next correction is
computed from G_{t+1} − H', so what one round leaves out is sent later (error feedback): a
client's copy never drifts away from the global, it trails it by at most what m directions
per round cannot carry.
"""

from __future__ import annotations

import math

import torch

from strategies.lora_math import Factors, truncate_lowrank


def difference(target: Factors, held: Factors) -> Factors:
    """G − H as factors, in float64: A = [A_G; A_H], B = [B_G, −B_H] per module, so
    B @ A = B_G A_G − B_H A_H. A module that H lacks counts as zero there."""
    out: Factors = {}
    for module, (a_g, b_g) in target.items():
        a, b = a_g.double(), b_g.double()
        if module in held:
            a_h, b_h = held[module]
            a = torch.cat([a, a_h.double()], dim=0)
            b = torch.cat([b, -b_h.double()], dim=1)
        out[module] = (a, b)
    return out


def correction(target: Factors, held: Factors, rank: int,
               dtype: torch.dtype) -> Factors:
    """The best rank-`rank` approximation of G − H per module (`truncate_lowrank` of the
    `difference`), cast to `dtype` (the wire dtype). Where G − H has rank ≤ `rank`, it is
    G − H itself, as factors of that smaller rank."""
    if rank <= 0:
        raise ValueError(f"correction rank={rank}; allowed: a positive integer")
    out: Factors = {}
    for module, (a, b) in difference(target, held).items():
        a_c, b_c, _ = truncate_lowrank(a, b, rank)
        out[module] = (a_c.to(dtype), b_c.to(dtype))
    return out


def squared_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖B @ A‖_F² from the factors: the sum of (BᵀB) ∘ (A Aᵀ), in float64."""
    a, b = a.double(), b.double()
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0))


def lag(target: Factors, held: Factors) -> float:
    """‖G − H‖_F / ‖G‖_F over all modules (1 for H = 0; for G = 0, 0 if H is zero too and
    1 otherwise: all of H is off)."""
    total = sum(squared_norm(a, b) for a, b in target.values())
    gap = sum(squared_norm(a, b) for a, b in difference(target, held).values())
    if total == 0.0:
        return 0.0 if gap == 0.0 else 1.0
    return math.sqrt(gap / total)


def correction_rank(limit_bytes: float, per_rank_bytes: int) -> int:
    """The largest rank m whose correction payload (m · `per_rank_bytes`) fits in
    `limit_bytes`; 0 when not even one direction fits."""
    if per_rank_bytes <= 0:
        raise ValueError(f"per_rank_bytes={per_rank_bytes}; allowed: a positive integer")
    return max(int(limit_bytes // per_rank_bytes), 0)


def per_rank_bytes(factors: Factors, dtype: torch.dtype) -> int:
    """Bytes one rank adds to factors over these modules: Σ (in + out) · element size."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum((a.shape[1] + b.shape[0]) * size for a, b in factors.values())
