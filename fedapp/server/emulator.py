"""FedBiOT's server side before round 1: pick the emulator's layers and align it with the
full model on public data (`strategies.fedbiot`, `strategies.biot_math`).

Public data: the topic pages of Python's own documentation (`pydoc_data.topics`, shipped
inside every CPython): English technical prose, a different dataset from any client's,
embedded, never downloaded. Its text, in sorted topic order, is cut into blocks of
`train.max_length` tokens; the first `public_examples` blocks are the alignment set, the
next `public_examples // 4` (at least one batch) are held out to measure the alignment.

1. Layers: LLM-Drop block scores (1 − cos(x, x + f(x))) of the full model on the alignment
   set, summed per layer; the emulator keeps the `emulator_layers` highest below the
   adapter (`biot_math.emulator_layers`).
2. Alignment: a LoRA E (`emulator_rank`) on the kept bottom layers' target modules is
   trained, `align_steps` AdamW steps, to distil the full model's next-token distribution
   into the emulator's (`biot_math.distill_loss`: KL(full ‖ emulator), the full model
   running on the fly as the teacher). It runs once, before round 1, when the adapter is
   still the base's (FedBiOT re-aligns each round with the current adapter; not done here:
   each re-alignment costs the server a full forward per step).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from logging import INFO

import torch
from flwr.common.logger import log

from fedapp.llm.adapters import lora_state, target_module_shapes, with_lora
from fedapp.llm.emulator import emulated
from fedapp.pruning.importance import llm_drop_importance
from fedapp.pruning.structure import decoder_layers
from strategies.biot_math import distill_loss, emulator_layers, fold_scaling, layer_scores
from strategies.lora_math import Factors, split_factors
from strategies.pipe_math import module_layers

PUBLIC_DATA = "pydoc_data.topics (Python's documentation topics, shipped with CPython)"


def public_blocks(tokenizer, max_length: int, count: int) -> list[list[int]]:
    """The first `count` blocks of `max_length` tokens of the public text; ValueError when
    the text has fewer."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    for name in sorted(topics):
        ids += tokenizer(topics[name], add_special_tokens=False)["input_ids"]
        if len(ids) >= count * max_length:
            break
    if len(ids) < count * max_length:
        raise ValueError(f"the public data holds {len(ids) // max_length} blocks of "
                         f"{max_length} tokens; asked for {count}")
    return [ids[i * max_length:(i + 1) * max_length] for i in range(count)]


def as_batches(blocks: Sequence[list[int]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[i:i + batch_size])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def mean_kl(model, base: torch.nn.Module, layers: Sequence[int],
            batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """The alignment loss over `batches`, without gradients."""
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            with model.disable_adapter():  # the teacher: the full model, no E
                teacher = logits(model, batch)
            with emulated(base, layers):
                total += float(distill_loss(logits(model, batch), teacher,
                                            batch["attention_mask"]))
    return total / len(batches)


def align(base: torch.nn.Module, layers: Sequence[int], boundary: int,
          sets: tuple[list, list], target_modules: list[str], rank: int, steps: int,
          lr: float, seed: int) -> tuple[Factors, dict[str, float]]:
    """E (scaling-1 factors on the kept layers below `boundary`) and the alignment loss on
    the held-out public blocks before and after (module docstring, step 2)."""
    train, held = sets
    shapes = target_module_shapes(base, target_modules)
    bottom = {m: rank for m, i in module_layers(shapes).items() if i < boundary and i in layers}
    figures: dict[str, float] = {}
    with with_lora(base, rank, 2.0 * rank, target_modules, seed, ranks=bottom) as model:
        figures["align-kl-before"] = mean_kl(model, base, layers, held)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        start = time.perf_counter()
        for step in range(steps):
            batch = train[step % len(train)]
            with torch.no_grad(), model.disable_adapter():
                teacher = logits(model, batch)
            with emulated(base, layers):
                loss = distill_loss(logits(model, batch), teacher, batch["attention_mask"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        figures["align-seconds"] = time.perf_counter() - start
        figures["align-kl-after"] = mean_kl(model, base, layers, held)
        state = lora_state(model)
    return fold_scaling(split_factors(state), 2.0), figures


def prepare_emulator(strategy, base: torch.nn.Module, tokenizer, max_length: int,
                     batch_size: int, target_modules: list[str]) -> None:
    """Steps 1 and 2 of the module docstring for a FedBiOT strategy, which keeps the result
    (`set_emulator`)."""
    count = strategy.public_examples
    blocks = public_blocks(tokenizer, max_length, count + max(count // 4, batch_size))
    train, held = as_batches(blocks[:count], batch_size), as_batches(blocks[count:], batch_size)
    num_layers = len(decoder_layers(base)[1])
    start = time.perf_counter()
    scores = layer_scores(llm_drop_importance(base, train).blocks, num_layers)
    layers = emulator_layers(scores, strategy.adapter_layers, strategy.emulator_keep)
    boundary = num_layers - strategy.adapter_layers
    log(INFO, "FedBiOT emulator: layers %s of %d (LLM-Drop on %d public blocks of %s, "
        "%.1f s); aligning it", ",".join(map(str, layers)), num_layers, count, PUBLIC_DATA,
        time.perf_counter() - start)
    factors, figures = align(base, layers, boundary, (train, held), target_modules,
                             strategy.emulator_rank, strategy.align_steps, strategy.align_lr,
                             strategy.seed)
    log(INFO, "FedBiOT emulator aligned in %.1f s: KL(full ‖ emulator) on held-out public "
        "blocks %.4f -> %.4f nats a token", figures["align-seconds"],
        figures["align-kl-before"], figures["align-kl-after"])
    strategy.set_emulator(layers, factors, figures)
