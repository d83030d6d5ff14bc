"""Least-squares refit of what structured pruning removes from a block's output.

Removing KV groups or MLP channels deletes input columns of the block's output Linear
(o_proj, down_proj): its output on a token x becomes W_S x_S instead of W x. Before slicing,
the kept columns can be re-fitted so that they reproduce as much of the removed part as the
kept inputs can explain, on the device's own calibration tokens X (in, n):

    W' = argmin_V ||W X - V X_S||^2 = W G[:, S] (G[S, S] + λ I)^-1,   G = X Xᵀ,

with λ = `damp` · the mean of diag(G[S, S]) keeping the solve well posed (the kept inputs are
often nearly collinear). The layer keeps its stock shape (out, |S|), so the exported model
stays a standard Llama. The fit uses the unpruned block's inputs: one forward, no
gradients, over the calibration batches joined into one (the output head on one position
per row), each layer fitted in a hook as the forward reaches it; a layer's Gram matrix
(in, in; float64 for the solve) lives only while that layer is fitted. Held until the
slicing quantises them, once: the fitted weights, in the 4-bit weights' dtype (SmolLM2
at 0.5: ≈35 MB in bf16).

A refitted model is no longer the base sliced to its kept indices (`PruneResult.kept`),
so nothing that rebuilds a structure from those indices (`fedapp.pruning.units`, the
store, the server's deployed models) reproduces it: FedSpine does not use it;
`scripts/bench_criteria.py` measures it (criteria written `fisher+ls`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedapp.pruning.structure import dense_weight

DAMP = 0.01


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor,
                  damp: float = DAMP) -> torch.Tensor:
    """The (out, |keep|) weight V minimising ||weight X - V X[keep]||^2 over inputs X whose
    Gram matrix X Xᵀ is `gram` (in, in), ridge `damp` · mean diag(gram[keep, keep]); float32."""
    if weight.shape[1] != gram.shape[0] or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} and gram {tuple(gram.shape)}; allowed: "
                         "weight (out, in) with gram (in, in)")
    if damp <= 0:
        raise ValueError(f"damp={damp}; allowed: > 0")
    g, keep = gram.detach().cpu().double(), keep.cpu()  # float64 on CPU (none on MPS)
    kept = g[keep][:, keep]  # (k, k)
    ridge = damp * kept.diagonal().mean().clamp_min(1e-12)
    kept = kept + ridge * torch.eye(len(keep), dtype=g.dtype)
    rhs = g[keep] @ weight.detach().cpu().double().T  # (k, out): G[S, :] Wᵀ
    factor = torch.linalg.cholesky(kept)
    return torch.cholesky_solve(rhs, factor).T.float().to(weight.device)  # (out, k)


def joined(batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-padded batches as one: each padded (masked out) to the widest one's width."""
    width = max(b["input_ids"].shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return {"input_ids": torch.cat([pad(b["input_ids"], 0) for b in batches]),
            "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches])}


def refitted_weights(model: nn.Module, targets: Mapping[str, tuple[nn.Module, torch.Tensor]],
                     batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: refitted (out, |keep|) weight} for each output Linear in `targets` (name ->
    (module, kept input columns)), fitted on the unpruned inputs the modules see when
    `model` runs over `batches` (one forward, no gradients, logits of one position per
    row); each in the dtype the layer's weight is quantised from (its own dtype for a plain
    Linear)."""
    if not batches:
        raise ValueError("a least-squares refit needs calibration batches; got none")
    batch = joined(batches)
    tokens = batch["attention_mask"].reshape(-1).bool()
    fitted: dict[str, torch.Tensor] = {}

    def hook_for(name: str, module: nn.Module, keep: torch.Tensor):
        def fit(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])[tokens].float()  # (n, in)
            base = getattr(module, "base_layer", module)
            state = getattr(base.weight, "quant_state", None)
            dtype = state.dtype if state is not None else base.weight.dtype
            fitted[name] = refit_columns(dense_weight(base), x.T @ x, keep).to(dtype)
        return fit

    handles = [module.register_forward_pre_hook(hook_for(name, module, keep))
               for name, (module, keep) in targets.items()]
    training = model.training
    model.eval()  # no LoRA dropout in the inputs fitted to
    try:
        with torch.no_grad():
            model(**batch, logits_to_keep=1, use_cache=False)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return fitted
