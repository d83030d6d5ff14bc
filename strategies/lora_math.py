"""Pure tensor math behind the LoRA aggregation strategies.

Everything here takes and returns plain tensors / dicts so it can be tested without a
federation. Conventions follow peft: for a Linear W of shape (out, in) an adapter adds
ΔW = scaling · B @ A with A = lora_A (r, in) and B = lora_B (out, r).

State dicts are keyed the way `peft.get_peft_model_state_dict` keys them, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per target module: (lora_A (r, in), lora_B (out, r))."""


@dataclass(frozen=True)
class LoraUpdate:
    """One client's adapter: its factors, its peft scaling and its aggregation weight."""

    factors: Factors
    scaling: float
    weight: float

    @property
    def rank(self) -> int:
        return rank_of(self.factors)


def rank_of(factors: Factors) -> int:
    """The one rank r shared by all modules' factors (lora_A is (r, in)).

    Raises ValueError when the modules disagree or there are no factors at all."""
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"factors must share one rank r; got ranks {sorted(ranks)}"
                         if ranks else "no LoRA factors at all (every target module dropped?)")
    return ranks.pop()


def split_factors(state: Mapping[str, torch.Tensor]) -> Factors:
    """Group a peft LoRA state dict into {module: (lora_A, lora_B)}.

    Raises ValueError naming the module when one of its two factors is missing or when
    the factors' shapes do not chain (A's rank must equal B's rank).
    """
    modules = sorted({k[: -len(LORA_A)] for k in state if k.endswith(LORA_A)}
                     | {k[: -len(LORA_B)] for k in state if k.endswith(LORA_B)})
    factors: Factors = {}
    for module in modules:
        a, b = state.get(module + LORA_A), state.get(module + LORA_B)
        if a is None or b is None:
            missing = LORA_A if a is None else LORA_B
            raise ValueError(f"adapter for '{module}' lacks '{missing.strip('.')}'")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"adapter for '{module}' has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}: expected (r, in) and (out, r) with the same r"
            )
        factors[module] = (a, b)
    return factors


def join_factors(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of `split_factors`."""
    state: dict[str, torch.Tensor] = {}
    for module, (a, b) in factors.items():
        state[module + LORA_A] = a
        state[module + LORA_B] = b
    return state


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """p_k = n_k / Σ n, refusing an empty or all-zero list."""
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"aggregation weights must be finite, >= 0, with a positive sum; "
                         f"got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def fedavg_factors(updates: Sequence[LoraUpdate]) -> Factors:
    """FedIT: A = Σ p_k A_k and B = Σ p_k B_k, for clients that share one rank."""
    ps = normalized_weights([u.weight for u in updates])
    ranks = {u.rank for u in updates}
    if len(ranks) != 1:
        raise ValueError(f"FedIT averages factors of one rank only, got ranks {sorted(ranks)}")
    out: Factors = {}
    for module in updates[0].factors:
        a = sum(p * u.factors[module][0].float() for p, u in zip(ps, updates))
        b = sum(p * u.factors[module][1].float() for p, u in zip(ps, updates))
        out[module] = (a, b)  # type: ignore[assignment]
    return out


def exact_delta(updates: Sequence[LoraUpdate], module: str) -> torch.Tensor:
    """The update every LoRA aggregation aims at: Σ p_k s_k B_k A_k, dense (out, in)."""
    ps = normalized_weights([u.weight for u in updates])
    delta = None
    for p, u in zip(ps, updates):
        a, b = u.factors[module]
        term = p * u.scaling * (b.float() @ a.float())  # (out, r) @ (r, in) -> (out, in)
        delta = term if delta is None else delta + term
    assert delta is not None
    return delta


def fedavg_noise(updates: Sequence[LoraUpdate]) -> float:
    """FedIT's aggregation noise: ‖s (Σ p B)(Σ p A) − Σ p s B A‖_F / ‖Σ p s B A‖_F.

    Summed over modules before the ratio. Zero when one client participates; grows with
    the clients' disagreement. Requires one shared scaling (FedIT's homogeneous setting).
    """
    scaling = updates[0].scaling
    avg = fedavg_factors(updates)
    err_sq, ref_sq = 0.0, 0.0
    for module, (a, b) in avg.items():
        exact = exact_delta(updates, module)
        err_sq += float(torch.linalg.matrix_norm(scaling * (b @ a) - exact) ** 2)
        ref_sq += float(torch.linalg.matrix_norm(exact) ** 2)
    return (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0


def scaled_parts(updates: Sequence[LoraUpdate],
                 dtype: torch.dtype | None = None) -> list[tuple[float, Factors]]:
    """Each client's (c_k = p_k s_k, factors), the factors cast to `dtype` (None: as they
    came): the inputs of `stack_scaled`, and what FLoRA's downlink sends slot by slot."""
    ps = normalized_weights([u.weight for u in updates])
    return [(p * u.scaling, u.factors if dtype is None else
             {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in u.factors.items()})
            for p, u in zip(ps, updates)]


def stack_scaled(parts: Sequence[tuple[float, Factors]],
                 dtype: torch.dtype = torch.float64) -> Factors:
    """A_s = cat_k(c_k A_k) on dim 0, B_s = cat_k(B_k) on dim 1, computed in `dtype`.

    Elementwise products and concatenations only: in float64 (c_k a Python float) the
    result is bitwise the same on any machine that gets the same inputs."""
    out: Factors = {}
    for module in parts[0][1]:
        a_s = torch.cat([c * f[module][0].to(dtype) for c, f in parts], dim=0)  # (Σr, in)
        b_s = torch.cat([f[module][1].to(dtype) for _, f in parts], dim=1)  # (out, Σr)
        out[module] = (a_s, b_s)
    return out


@dataclass(frozen=True)
class WireStack:
    """FLoRA's round update at the uploads' precision: per module the uploaded A_k stacked
    on dim 0 and B_k on dim 1 as they came (the wire dtype), and c_k = p_k s_k once per
    stacked row, so Δ_m = B_m diag(c_m) A_m = Σ_k c_k B_k A_k exactly.

    Forming it copies the uploads; c is applied in float64 where Δ is used (`scaled_module`:
    bitwise the values of `stack_scaled` in float64)."""

    factors: Factors
    coefficients: dict[str, torch.Tensor]  # per module: (Σ r_k,) float64

    def scaled_module(self, module: str, dtype: torch.dtype = torch.float64
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors[module]
        return self.coefficients[module].to(dtype)[:, None] * a.to(dtype), b.to(dtype)

    def scaled(self, dtype: torch.dtype = torch.float64) -> Factors:
        return {m: self.scaled_module(m, dtype) for m in self.factors}


def wire_stack(parts: Sequence[tuple[float, Factors]]) -> WireStack:
    """`stack_scaled` without its float64 copy: the parts' factors (one dtype) as they are."""
    coefficients = {m: torch.tensor([c for c, f in parts for _ in range(f[m][0].shape[0])],
                                    dtype=torch.float64) for m in parts[0][1]}
    return WireStack(cat_slots([f for _, f in parts]), coefficients)


def stack_factors(updates: Sequence[LoraUpdate]) -> Factors:
    """FLoRA stacking: A_s = cat_k(p_k s_k A_k) on dim 0, B_s = cat_k(B_k) on dim 1 (fp32).

    Then B_s @ A_s = Σ p_k s_k B_k A_k exactly, whatever the mix of ranks. The result has
    scaling 1 and rank Σ r_k.
    """
    return stack_scaled(scaled_parts(updates), torch.float32)


def cat_slots(slots: Sequence[Factors]) -> Factors:
    """Slots (factors of ranks r_j, same modules) side by side: A on dim 0, B on dim 1."""
    return {m: (torch.cat([f[m][0] for f in slots]), torch.cat([f[m][1] for f in slots], 1))
            for m in slots[0]} if slots else {}


def split_slots(joined: Factors, ranks: Sequence[int]) -> list[Factors]:
    """Inverse of `cat_slots`: cut every module's factors into slots of `ranks`.

    Raises ValueError when a module's rank is not Σ ranks."""
    for module, (a, _) in joined.items():
        if a.shape[0] != sum(ranks):
            raise ValueError(f"'{module}' has rank {a.shape[0]}; the slots of ranks "
                             f"{list(ranks)} need {sum(ranks)}")
    slots: list[Factors] = [{} for _ in ranks]
    for module, (a, b) in joined.items():
        for slot, a_j, b_j in zip(slots, a.split(list(ranks)), b.split(list(ranks), dim=1)):
            slot[module] = (a_j, b_j)
    return slots


def append_factors(global_factors: Factors, new: Factors) -> Factors:
    """G + ΔG as factors: stack the round's update beside the running global update."""
    if not global_factors:
        return {m: (a.clone(), b.clone()) for m, (a, b) in new.items()}
    out: Factors = {}
    for module, (a_new, b_new) in new.items():
        a_g, b_g = global_factors[module]
        out[module] = (torch.cat([a_g, a_new], dim=0), torch.cat([b_g, b_new], dim=1))
    return out


def truncate_lowrank(a: torch.Tensor, b: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`budget` approximation of B @ A, without forming the dense matrix.

    QR both factors (B = Q_b R_b, Aᵀ = Q_a R_a), SVD the small core R_b R_aᵀ (R×R), keep
    the top `budget` singular triplets and split √σ to each side. Cost O((out+in)·R²).
    Always returns rank `budget` (zero-padded where a layer's own rank is smaller).
    Returns (A', B', dropped) with dropped = ‖BA − B'A'‖_F / ‖BA‖_F (Eckart–Young: this is
    the optimal rank-`budget` error). Exact (dropped 0) when rank R ≤ budget.
    """
    rank = a.shape[0]
    if rank <= budget:
        return a, b, 0.0
    q_b, r_b = torch.linalg.qr(b.double())  # (out, m), (m, R), m = min(out, R)
    q_a, r_a = torch.linalg.qr(a.double().T)  # (in, n), (n, R), n = min(in, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # core (m, n): at most min(m, n) values
    k = min(budget, s.numel())
    root = s[:k].sqrt()
    b_new = (q_b @ u[:, :k]) * root  # (out, m) @ (m, k) -> (out, k)
    a_new = root[:, None] * (vh[:k] @ q_a.T)  # (k, n) @ (n, in) -> (k, in)
    if k < budget:  # the layer is smaller than the budget: pad so every module has one rank
        b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], budget - k)], dim=1)
        a_new = torch.cat([a_new, a_new.new_zeros(budget - k, a_new.shape[1])], dim=0)
    total = float((s**2).sum())
    dropped = float((s[k:] ** 2).sum() / total) ** 0.5 if total > 0 else 0.0
    return a_new.to(a.dtype), b_new.to(b.dtype), dropped


def truncate_factors(factors: Factors, budget: int) -> tuple[Factors, float]:
    """Apply `truncate_lowrank` per module; return the worst relative error dropped."""
    out: Factors = {}
    worst = 0.0
    for module, (a, b) in factors.items():
        a_t, b_t, dropped = truncate_lowrank(a, b, budget)
        out[module] = (a_t, b_t)
        worst = max(worst, dropped)
    return out, worst


@contextmanager
def _one_thread() -> Iterator[None]:
    """MKL's blocked QR / SVD round differently with different thread counts: pin one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def next_global(prev: Factors, increment: Factors | WireStack, budget: int,
                dtype: torch.dtype) -> tuple[Factors, float]:
    """FLoRA's global after a round: G_t = truncate(append(G_{t-1}, Δ_t), budget), in
    float64 on one CPU thread, cast to `dtype` (the wire dtype); and the error dropped.

    Module by module: one module's float64 copy is alive at a time (a 7B-shaped round
    needs the wire-precision stack and one module's working set, not all in float64).

    The server defines G_t this way and a returning client recomputes it from the same
    inputs (its held G_{t-1} and the round's Δ_t, both at wire precision), so the two agree
    bitwise on one platform (same torch and LAPACK build, same thread count: pinned here).
    Across platforms LAPACK may round differently or pick other signs (or bases, for repeated
    singular values): the factors differ, but the products B @ A agree to rounding.
    """
    out: Factors = {}
    worst = 0.0
    with _one_thread():
        stack = increment if isinstance(increment, WireStack) else None
        for module in stack.factors if stack else increment:
            a, b = stack.scaled_module(module) if stack else map(torch.Tensor.double,
                                                                 increment[module])
            if prev:  # G_{t-1} beside Δ_t
                a = torch.cat([prev[module][0].double(), a], dim=0)
                b = torch.cat([prev[module][1].double(), b], dim=1)
            a, b, dropped = truncate_lowrank(a, b, budget)
            out[module] = (a.to(dtype), b.to(dtype))
            worst = max(worst, dropped)
    return out, worst


def digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short fingerprint of a state dict's keys, dtypes, shapes and bytes (blake2b)."""
    h = hashlib.blake2b(digest_size=8)
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def zeropad_factors(updates: Sequence[LoraUpdate]) -> Factors:
    """HetLoRA-style zero-padding: pad every client to the largest rank, then average.

    Each client's scaling is folded into its A first, so the result has scaling 1:
    A = Σ p_k pad(s_k A_k), B = Σ p_k pad(B_k). Lossy: B @ A ≠ Σ p_k s_k B_k A_k in general.
    """
    ps = normalized_weights([u.weight for u in updates])
    r_max = max(u.rank for u in updates)
    out: Factors = {}
    for module in updates[0].factors:
        a_sum, b_sum = None, None
        for p, u in zip(ps, updates):
            a, b = u.factors[module]
            pad = r_max - a.shape[0]
            a_pad = torch.cat([u.scaling * a.float(), a.new_zeros(pad, a.shape[1]).float()])
            b_pad = torch.cat([b.float(), b.new_zeros(b.shape[0], pad).float()], dim=1)
            a_sum = p * a_pad if a_sum is None else a_sum + p * a_pad  # (r_max, in)
            b_sum = p * b_pad if b_sum is None else b_sum + p * b_pad  # (out, r_max)
        out[module] = (a_sum, b_sum)  # type: ignore[assignment]
    return out


def keep_untrained(factors: Factors, previous: Factors) -> Factors:
    """`factors` (a round's zero-padded average, rank r) with the rank components of
    `previous` (the global before the round, same scaling) beyond r appended: components
    no client of the round trained keep their values instead of being dropped."""
    out: Factors = {}
    for module, (a, b) in factors.items():
        r = a.shape[0]
        if module in previous and previous[module][0].shape[0] > r:
            pa, pb = previous[module]
            a = torch.cat([a, pa[r:].to(a.dtype)])
            b = torch.cat([b, pb[:, r:].to(b.dtype)], dim=1)
        out[module] = (a, b)
    return out


def fresh_rows(factors: Factors, r: int, seed: int) -> Factors:
    """`factors` grown to rank r as a new LoRA grows: the added rows of A drawn like peft's
    lora_A init (uniform in ±1 / sqrt(in), seeded), the added columns of B zero, so the
    product is unchanged and the new components can learn."""
    gen = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for module, (a, b) in sorted(factors.items()):
        add = r - a.shape[0]
        if add > 0:
            bound = a.shape[1] ** -0.5
            new = (torch.rand(add, a.shape[1], generator=gen) * 2 - 1) * bound
            a = torch.cat([a, new.to(a.dtype)])
            b = torch.cat([b, b.new_zeros(b.shape[0], add)], dim=1)
        out[module] = (a, b)
    return out


def relative_error(factors: Factors, updates: Sequence[LoraUpdate]) -> float:
    """‖Σ_modules (B @ A − Σ p s B_k A_k)‖_F / ‖Σ p s B_k A_k‖_F for scaling-1 `factors`."""
    err_sq, ref_sq = 0.0, 0.0
    for module, (a, b) in factors.items():
        exact = exact_delta(updates, module)
        err_sq += float(torch.linalg.matrix_norm(b.float() @ a.float() - exact) ** 2)
        ref_sq += float(torch.linalg.matrix_norm(exact) ** 2)
    return (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0


def factors_for_client(global_factors: Factors, r: int, scaling: float) -> Factors:
    """FlexLoRA's download: the best rank-r approximation of the global update, split so that
    a client with peft scaling s reproduces it (s · B @ A = truncation)."""
    out: Factors = {}
    root = scaling ** 0.5
    for module, (a, b) in global_factors.items():
        a_r, b_r, _ = truncate_lowrank(a, b, r)
        if a_r.shape[0] < r:  # the global update has lower rank than the client's LoRA
            a_r = torch.cat([a_r, a_r.new_zeros(r - a_r.shape[0], a_r.shape[1])])
            b_r = torch.cat([b_r, b_r.new_zeros(b_r.shape[0], r - b_r.shape[1])], dim=1)
        out[module] = (a_r / root, b_r / root)
    return out


def average_b(updates: Sequence[LoraUpdate]) -> dict[str, torch.Tensor]:
    """FFA-LoRA: every client shares one frozen A, so averaging B alone is exact:
    (Σ p_k B_k) @ A = Σ p_k B_k @ A."""
    ps = normalized_weights([u.weight for u in updates])
    return {module: sum(p * u.factors[module][1].float() for p, u in zip(ps, updates))
            for module in updates[0].factors}  # type: ignore[misc]
