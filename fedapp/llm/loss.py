"""The causal-LM loss without the full-vocabulary logits.

A plain forward computes `lm_head` over every position of the batch (batch × seq × vocab
fp32: 100 MiB for SmolLM2 at 4 × 128 × 49,152), then log-softmax, then the same sizes again
in the backward pass; on a small model that is most of a training step's memory and a third
of its time. The loss only needs the positions that have a label (the responses, shifted
by one). `lm_loss` takes the decoder's hidden states, keeps those positions, and computes
the cross-entropy in chunks of `chunk_tokens` rows: each chunk's logits live only inside
the chunk, and the gradient with respect to the hidden states, (softmax − one-hot) @ W, is
computed in the same pass and kept (it is tokens × hidden, small). The backward pass only
scales it. The output head must be frozen (it is: LoRA never targets it here), which is
what makes the gradient of W unnecessary.

Same value as the model's own loss (mean over labelled tokens, logits upcast to fp32,
Gemma's final soft-capping applied) up to summation order; `tests/test_loss.py` pins it.
An NF4 head (`model.quantization=nf4-embeddings`, `fedapp.llm.embedding`) is decoded
`BLOCK_ROWS` vocabulary rows at a time inside each chunk: a running log-sum-exp over the
blocks, then a second pass for the gradient, so its fp32 matrix never exists whole either.
Models whose head does something else (a trainable or bitsandbytes-quantised head, a bias,
a logit scale) fall back to the plain forward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedapp.llm.data import IGNORE_INDEX
from fedapp.llm.embedding import BLOCK_ROWS, Nf4Head, Nf4Table
from strategies.protocol import LOSSES

CHUNK_BYTES = 16 * 2**20  # fp32 logits held at once: 16 MiB = 85 tokens of a 49k vocabulary
_SCALE_ATTRS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


class _Capture(torch.nn.Module):
    """Stands in for the output head for one forward: keeps the hidden states it is given
    and returns a one-wide placeholder, so no full logits are ever computed."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden.new_zeros((*hidden.shape[:-1], 1))


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a peft model (or the model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner


def chunkable_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The frozen plain `nn.Linear` output head (or NF4 head, `fedapp.llm.embedding`) the
    chunked loss can use, else None."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    config = getattr(lm, "config", None)
    if type(head) is Nf4Head:
        pass
    elif type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    if any(getattr(config, a, None) not in (None, 1, 1.0) for a in _SCALE_ATTRS):
        return None
    return head


def softcap_of(model: torch.nn.Module) -> float | None:
    cap = getattr(getattr(causal_lm(model), "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def _capped(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp32 logits of `hidden @ weight.T`, soft-capped; the tanh, for the derivative)."""
    logits = (hidden @ weight.to(hidden.dtype).T).float()
    if softcap is None:
        return logits, None
    squashed = torch.tanh(logits / softcap)
    return squashed * softcap, squashed


def _at(y: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows whose target lies in vocabulary rows [start, start + width), its column there)."""
    inside = ((y >= start) & (y < start + width)).nonzero().squeeze(1)
    return inside, y[inside] - start


def _blocked_lse(h: torch.Tensor, y: torch.Tensor, table: Nf4Table, softcap: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp over the vocabulary, the target's logit) per row of `h`, the logits
    computed one decoded vocabulary block at a time (a running max keeps exp in range)."""
    top = torch.full((len(h),), -torch.inf, device=h.device)
    total, picked = torch.zeros(len(h), device=h.device), torch.zeros(len(h), device=h.device)
    for start, w in table.blocks(reuse=True):
        logits, _ = _capped(h, w, softcap)
        inside, column = _at(y, start, len(w))
        picked[inside] = logits[inside, column]
        new_top = torch.maximum(top, logits.amax(1))
        total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(1)
        top = new_top
    return top + torch.log(total), picked


def _dense_chunk(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 softcap: float | None, want_grad: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed cross-entropy of the rows, their dL/dh unscaled or None) with `weight` whole."""
    logits, squashed = _capped(h, weight, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
    if not want_grad:
        return loss, None
    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    probs[torch.arange(len(y), device=y.device), y] -= 1.0
    if squashed is not None:
        probs.mul_(1.0 - squashed.square_())  # d(c·tanh(z/c))/dz
    return loss, probs.to(weight.dtype) @ weight


def _blocked_chunk(h: torch.Tensor, y: torch.Tensor, table: Nf4Table, softcap: float | None,
                   want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_dense_chunk` for an NF4 head: the vocabulary taken block by block, twice (the
    log-sum-exp first, then the softmax's gradient)."""
    lse, picked = _blocked_lse(h, y, table, softcap)
    if not want_grad:
        return (lse - picked).sum(), None
    grad = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for first, w in table.blocks(reuse=True):
        logits, squashed = _capped(h, w, softcap)
        probs = logits.sub_(lse[:, None]).exp_()
        inside, column = _at(y, first, len(w))
        probs[inside, column] -= 1.0
        if squashed is not None:
            probs.mul_(1.0 - squashed.square_())
        grad += probs @ w
    return (lse - picked).sum(), grad


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(softcap(h_i Wᵀ), y_i) over rows, in chunks; dL/dh computed on the way."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor | Nf4Table,
                targets: torch.Tensor, softcap: float | None, rows: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        chunk = _blocked_chunk if isinstance(weight, Nf4Table) else _dense_chunk
        n = hidden.shape[0]
        for start in range(0, n, rows):
            loss, part = chunk(hidden[start:start + rows], targets[start:start + rows], weight,
                               softcap, grad is not None)
            total += loss
            if part is not None:
                grad[start:start + rows] = part.to(hidden.dtype)
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * (grad_out / ctx.n).to(grad.dtype), None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor | Nf4Table,
                          targets: torch.Tensor, softcap: float | None = None,
                          rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (optionally soft-capped) against `targets`,
    rows (tokens) at a time; `weight` is frozen (a tensor, or an NF4 table decoded block by
    block). hidden (N, H), weight (V, H), targets (N,)."""
    if hidden.shape[0] == 0:
        raise ValueError("no labelled tokens in the batch")
    if rows is None:
        blocked = isinstance(weight, Nf4Table)
        rows = _chunk_rows(min(BLOCK_ROWS, weight.shape[0]) if blocked else weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, softcap, rows)


def _hidden_states(model: torch.nn.Module, head: torch.nn.Linear,
                   batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states (batch, len, hidden), the output head never run."""
    lm = causal_lm(model)
    capture = _Capture()
    lm.set_output_embeddings(capture)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        lm.set_output_embeddings(head)
    assert capture.hidden is not None
    return capture.hidden


@torch.no_grad()
def labelled_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each labelled next token, row by row; the (batch, len-1) mask of
    where they are). Through the chunked head when the model allows, so that evaluating a
    262k-token vocabulary costs a chunk of logits, not batch × len × vocab."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    head = chunkable_head(model)
    if head is None:
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch.get("attention_mask")).logits[:, :-1][keep].float()
        return torch.log_softmax(logits, -1).gather(1, labels[keep][:, None]).squeeze(1), keep
    hidden, targets = _hidden_states(model, head, batch)[:, :-1][keep], labels[keep]
    if type(head) is Nf4Head:
        rows, out = CHUNK_BYTES // (4 * BLOCK_ROWS), []
        for start in range(0, hidden.shape[0], rows):
            lse, picked = _blocked_lse(hidden[start:start + rows], targets[start:start + rows],
                                       head.table, softcap_of(model))
            out.append(picked - lse)
        return (torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)), keep
    softcap, rows, out = softcap_of(model), _chunk_rows(head.weight.shape[0]), []
    for start in range(0, hidden.shape[0], rows):
        logits = (hidden[start:start + rows] @ head.weight.to(hidden.dtype).T).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        picked = logits.gather(1, targets[start:start + rows, None]).squeeze(1)
        out.append(picked - torch.logsumexp(logits, dim=-1))
    return (torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)), keep


def lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
            loss: str = "chunked") -> torch.Tensor:
    """The mean next-token loss over the labelled tokens of `batch`, as `model(**batch).loss`
    computes it; "chunked" never materialises the full logits (see the module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"train.loss={loss!r}; allowed: {list(LOSSES)}")
    head = chunkable_head(model) if loss == "chunked" else None
    if head is None:
        return model(**batch).loss
    hidden, labels = _hidden_states(model, head, batch)[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    weight = head.table if type(head) is Nf4Head else head.weight
    return chunked_cross_entropy(hidden[keep], weight, labels[keep], softcap_of(model))
