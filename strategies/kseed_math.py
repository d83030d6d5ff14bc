"""FedKSeed's math: zeroth-order steps whose perturbations all come from K shared seeds.

The trainable state. The base stays 4-bit and frozen (perturbing it would mean re-quantising
it). What is tuned is a LoRA on the target modules whose A is fixed at a random matrix drawn
from the run's seed, as in FFA-LoRA, and whose B starts at zero: ΔW = s · B A with
s = lora_alpha / r. Only B is perturbed, for two reasons: the variance of a zeroth-order
gradient estimate grows with the number of parameters perturbed, so halving them helps; and
the model is then linear in the state, so averaging states is exact aggregation.

A local step, for a seed index i drawn from {0..K-1} (uniformly, or FedKSeed-Pro's
probabilities below):
    z = perturbation(i)                         (one N(0, 1) entry per entry of B)
    g = (L(B + εz) − L(B − εz)) / (2ε)          (two forward passes, no backward)
    B ← B − η g z
and the client uploads only (i, g) per step. Because every z is one of K fixed vectors, every
state ever reached is B = −η Σ_i C_i z_i for a vector C of K scalars. The server keeps C:
client k's steps add c_k (its g's summed per seed) to its own start, so the example-weighted
average of the clients' states is C ← C + Σ_k p_k c_k, exactly. A client (or the server, to
evaluate) rebuilds B from C by generating the perturbations of the seeds with C_i ≠ 0: at
most K of them, however many rounds it missed.

FedKSeed-Pro samples seed i with probability softmax(|C_i| / max_j |C_j|): seeds whose
directions have moved the model most are drawn more often, the most by a factor of at most
e over the least (our choice of normalisation; uniform until C has a non-zero entry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.lora_math import LORA_A, LORA_B
from strategies.protocol import ZO_SAMPLINGS

SCALARS, SEEDS, GRADS = "kseed.scalars", "kseed.seeds", "kseed.grads"  # array names
Shapes = Mapping[str, tuple[int, int]]  # peft module key -> (out, in)


def candidate_seed(run_seed: int, index: int) -> int:
    """The torch seed of candidate `index` (0..K-1) in a run seeded `run_seed`."""
    return (run_seed * 1_000_003 + 7_919 * (index + 1)) % (2**63 - 1)


def frozen_a(shapes: Shapes, r: int, run_seed: int) -> dict[str, torch.Tensor]:
    """Every module's fixed A (r, in): N(0, 1/in) entries, drawn from the run's seed in
    sorted module order, so every process draws the same matrices."""
    gen = torch.Generator().manual_seed(run_seed * 2 + 1)
    return {m: torch.randn(r, shapes[m][1], generator=gen) / shapes[m][1] ** 0.5
            for m in sorted(shapes)}


def perturbation(shapes: Shapes, r: int, run_seed: int, index: int) -> dict[str, torch.Tensor]:
    """Candidate `index`'s direction: an (out, r) N(0, 1) matrix per module, sorted order."""
    gen = torch.Generator().manual_seed(candidate_seed(run_seed, index))
    return {m: torch.randn(shapes[m][0], r, generator=gen) for m in sorted(shapes)}


def replay(shapes: Shapes, r: int, run_seed: int, scalars: torch.Tensor, lr: float
           ) -> dict[str, torch.Tensor]:
    """B = −η Σ_i C_i z_i (float32 per module), generating only the seeds with C_i ≠ 0."""
    b = {m: torch.zeros(shapes[m][0], r, dtype=torch.float64) for m in shapes}
    for index in torch.nonzero(scalars).flatten().tolist():
        coefficient = -lr * float(scalars[index])
        for m, z in perturbation(shapes, r, run_seed, index).items():
            b[m].add_(z.double(), alpha=coefficient)
    return {m: v.float() for m, v in b.items()}


def adapter_state(shapes: Shapes, r: int, run_seed: int, scalars: torch.Tensor, lr: float
                  ) -> dict[str, torch.Tensor]:
    """The peft LoRA state (A fixed, B replayed) that the scalars stand for."""
    a, b = frozen_a(shapes, r, run_seed), replay(shapes, r, run_seed, scalars, lr)
    return {**{m + LORA_A: a[m] for m in shapes}, **{m + LORA_B: b[m] for m in shapes}}


def seed_sums(indices: torch.Tensor, grads: torch.Tensor, k: int) -> torch.Tensor:
    """One client's c: its projected gradients summed per seed index (float64, length K)."""
    return torch.zeros(k, dtype=torch.float64).index_add_(0, indices.long(), grads.double())


def accumulate(scalars: torch.Tensor, updates: Sequence[tuple[float, torch.Tensor]]
               ) -> torch.Tensor:
    """C ← C + Σ_k p_k c_k, p_k the clients' weights normalised to sum to 1."""
    total = sum(w for w, _ in updates)
    if not updates or total <= 0:
        raise ValueError("accumulate needs at least one update with a positive weight")
    out = scalars.double().clone()
    for weight, sums in updates:
        out.add_(sums.double(), alpha=weight / total)
    return out


def seed_probabilities(scalars: torch.Tensor, sampling: str) -> torch.Tensor:
    """How likely each seed is drawn: uniform, or FedKSeed-Pro's softmax(|C| / max |C|)."""
    if sampling not in ZO_SAMPLINGS:
        raise ValueError(f"strategy.sampling={sampling!r}; allowed: {list(ZO_SAMPLINGS)}")
    k = scalars.numel()
    magnitude = scalars.double().abs()
    if sampling == "uniform" or float(magnitude.max()) == 0.0:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    return torch.softmax(magnitude / magnitude.max(), dim=0)


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """The two-point estimate of the directional derivative along z."""
    return (loss_plus - loss_minus) / (2.0 * eps)
