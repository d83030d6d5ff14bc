"""Local LoRA training steps and held-out evaluation: plain PyTorch loops."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from logging import INFO

import torch
from flwr.common.logger import log

from fedapp.llm.data import IGNORE_INDEX, collate
from fedapp.llm.loss import lm_loss


@dataclass(frozen=True)
class TrainResult:
    loss: float
    seconds: float
    steps: int


def set_gradient_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass (or stop doing so).
    Exact: the same numbers are recomputed; only memory and time change."""
    if on:  # transformers 5's names (the gradient_checkpointing_* ones are deprecated)
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    elif model.is_activation_checkpointing:
        model.activation_checkpointing_disable()


def train_steps(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]],
                steps: int, lr: float, log_every: int = 10, loss: str = "chunked",
                log_seconds: float = 30.0) -> TrainResult:
    """`steps` AdamW steps on the parameters that require grad; mean loss over steps.

    Progress is logged every `log_every` steps and at least every `log_seconds` (0 turns
    logging off), so a slow device's log shows it is alive."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: attach a LoRA first")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = params[0].device
    model.train()
    losses: list[float] = []
    start = logged = time.perf_counter()
    for step in range(1, steps + 1):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        value = lm_loss(model, batch, loss)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value.item())
        now = time.perf_counter()
        if log_every and step < steps and (step % log_every == 0 or now - logged > log_seconds):
            logged = now
            log(INFO, "  step %d/%d  loss %.4f  (%.2f s/step)", step, steps, losses[-1],
                (now - start) / step)
    seconds = time.perf_counter() - start
    return TrainResult(loss=sum(losses) / len(losses), seconds=seconds, steps=steps)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, examples: list[dict], batch_size: int,
              pad_token_id: int) -> float:
    """Mean next-token loss over all response tokens of `examples` (token-weighted)."""
    if not examples:
        raise ValueError("no evaluation examples")
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(lm_loss(model, batch)) * n_tokens
        count += n_tokens
    return total / count
