"""LoRA adapters on a frozen base: attach, read out, remove.

The base model is cached per process, so every function here leaves it as it found it:
`attach_lora` injects peft layers in place and `detach_lora` takes them out again.

The server's global low-rank update G = B @ A (FLoRA, FedSpine) is applied the one way peft
applies any adapter: a second, frozen LoRA named "global" (rank R, lora_alpha = R, so its
scaling is 1) beside the trainable "default" one. Each wrapped layer then computes
base(x) + G x + s · B A x, in that order. Structured pruning slices every adapter of a
wrapper together with its base layer, so G follows a pruned layer exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

from strategies.lora_math import LORA_A, split_factors

PEFT_PREFIX = "base_model.model."
TRAINED, GLOBAL = "default", "global"  # adapter names: the client's own, the server's frozen G


def lora_config(r: int, lora_alpha: float, target_modules: list[str],
                ranks: Mapping[str, int] | None = None) -> LoraConfig:
    """A rank-r LoRA on every layer named by `target_modules`; with `ranks` ({peft module
    key: rank}, FedPipe) exactly those modules, each at its rank with lora_alpha scaled
    alike, so that every module's scaling is lora_alpha / r."""
    if not ranks:
        return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    names = {re.escape(m.removeprefix(PEFT_PREFIX)): k for m, k in ranks.items()}
    return LoraConfig(r=r, lora_alpha=lora_alpha,
                      target_modules=[m.removeprefix(PEFT_PREFIX) for m in ranks],
                      rank_pattern=names,
                      alpha_pattern={n: lora_alpha * k / r for n, k in names.items()},
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def adapter_targets(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The layer names (e.g. q_proj) an adapter state dict covers, for a LoraConfig."""
    return sorted({k.removeprefix(PEFT_PREFIX)[: -len(LORA_A)].rsplit(".", 1)[-1]
                   for k in state if k.endswith(LORA_A)})


def attach_lora(base: torch.nn.Module, r: int, lora_alpha: float, target_modules: list[str],
                seed: int, init_state: Mapping[str, torch.Tensor] | None = None,
                frozen_global: Mapping[str, torch.Tensor] | None = None,
                train_lora_a: bool = True, ranks: Mapping[str, int] | None = None
                ) -> PeftModel:
    """Inject a trainable LoRA (peft's init under `seed`, or `init_state` when given).

    `frozen_global`: the server's update G as scaling-1 LoRA factors (peft keys), attached
    as the frozen adapter "global" and applied before the trainable one (modules of
    different ranks: each at its own, FedBiOT's E beside G). `train_lora_a`
    False keeps lora_A at its initial value (FFA-LoRA). `ranks`: per-module ranks of the
    trainable LoRA (`lora_config`)."""
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(r, lora_alpha, target_modules, ranks))
    if init_state:
        load_adapter_state(model, init_state, TRAINED)
    if frozen_global:
        global_ranks = {m: a.shape[0] for m, (a, _) in split_factors(frozen_global).items()}
        rank = max(global_ranks.values())
        config = lora_config(rank, rank, adapter_targets(frozen_global)) \
            if len(set(global_ranks.values())) == 1 else \
            lora_config(rank, rank, [], global_ranks)  # per module, each at scaling 1
        with torch.random.fork_rng(devices=[]):  # G's placeholder init draws no seeded numbers
            model.add_adapter(GLOBAL, config)
        load_adapter_state(model, frozen_global, GLOBAL)
        model.base_model.set_adapter([GLOBAL, TRAINED])  # forward: base + G, then + s·B·A
    for name, param in model.named_parameters():
        param.requires_grad_(f".{TRAINED}." in name and "lora_" in name
                             and (train_lora_a or "lora_A" not in name))
    return model


def load_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor],
                       adapter: str) -> None:
    """Copy peft-keyed factors into `adapter`, refusing keys the model lacks."""
    result = set_peft_model_state_dict(model, dict(state), adapter_name=adapter)
    if result.unexpected_keys:
        raise ValueError(f"adapter keys not in the model: {result.unexpected_keys[:3]}")


def lora_state(model: PeftModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The trainable adapter as `get_peft_model_state_dict` keys it, detached, on CPU, in
    `dtype`."""
    return {k: v.detach().to("cpu", dtype).contiguous()
            for k, v in get_peft_model_state_dict(model, adapter_name=TRAINED).items()}


def detach_lora(model: PeftModel) -> torch.nn.Module:
    """Remove the injected LoRA layers (all adapters), giving back the untouched base."""
    return model.unload()


@contextmanager
def with_lora(base: torch.nn.Module, r: int, lora_alpha: float, target_modules: list[str],
              seed: int, init_state: Mapping[str, torch.Tensor] | None = None,
              frozen_global: Mapping[str, torch.Tensor] | None = None,
              train_lora_a: bool = True, ranks: Mapping[str, int] | None = None
              ) -> Iterator[PeftModel]:
    """`attach_lora` for the duration of a block; the base is restored even on errors."""
    model = attach_lora(base, r, lora_alpha, target_modules, seed, init_state, frozen_global,
                        train_lora_a, ranks)
    try:
        yield model
    finally:
        detach_lora(model)


def target_module_shapes(base: torch.nn.Module,
                         target_modules: list[str]) -> dict[str, tuple[int, int]]:
    """{peft module key: (out, in)} for every Linear a LoRA on `target_modules` would wrap."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] in target_modules and hasattr(module, "in_features"):
            shapes[PEFT_PREFIX + name] = (module.out_features, module.in_features)
    if not shapes:
        raise ValueError(f"lora.target_modules={target_modules} matches no Linear layer of "
                         "the model")
    return shapes
