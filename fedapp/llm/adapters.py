"""LoRA adapters on a frozen base: attach, read out, remove; and the frozen global term.

The base model is cached per process, so every function here leaves it as it found it:
`attach_lora` injects peft layers in place and `detach_lora` takes them out again.
"""

from __future__ import annotations

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

from strategies.lora_math import split_factors

PEFT_PREFIX = "base_model.model."


def lora_config(r: int, lora_alpha: float, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def attach_lora(base: torch.nn.Module, r: int, lora_alpha: float, target_modules: list[str],
                seed: int, init_state: Mapping[str, torch.Tensor] | None = None) -> PeftModel:
    """Inject a trainable LoRA (peft's init under `seed`, or `init_state` when given)."""
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(r, lora_alpha, target_modules))
    if init_state:
        result = set_peft_model_state_dict(model, dict(init_state))
        if result.unexpected_keys:
            raise ValueError(f"adapter keys not in the model: {result.unexpected_keys[:3]}")
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def lora_state(model: PeftModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapter as `get_peft_model_state_dict` keys it, detached, on CPU, in `dtype`."""
    return {k: v.detach().to("cpu", dtype).contiguous()
            for k, v in get_peft_model_state_dict(model).items()}


def detach_lora(model: PeftModel) -> torch.nn.Module:
    """Remove the injected LoRA layers, giving back the untouched base."""
    return model.unload()


@contextmanager
def with_lora(base: torch.nn.Module, r: int, lora_alpha: float, target_modules: list[str],
              seed: int, init_state: Mapping[str, torch.Tensor] | None = None
              ) -> Iterator[PeftModel]:
    """`attach_lora` for the duration of a block; the base is restored even on errors."""
    model = attach_lora(base, r, lora_alpha, target_modules, seed, init_state)
    try:
        yield model
    finally:
        detach_lora(model)


def add_low_rank(x: torch.Tensor, output: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """output + scaling · x Aᵀ Bᵀ, computed in A's dtype and returned in output's."""
    delta = (x.to(a.dtype) @ a.T) @ b.T  # (.., in) @ (in, R) @ (R, out) -> (.., out)
    return output + (scaling * delta).to(output.dtype)


@contextmanager
def frozen_delta(base: torch.nn.Module, state: Mapping[str, torch.Tensor],
                 scaling: float = 1.0) -> Iterator[int]:
    """Add scaling · x Aᵀ Bᵀ to each targeted Linear's output, with no trainable parameter.

    This is how a client applies the server's global low-rank update beside the 4-bit base
    without requantising it. Keys are peft adapter keys; yields the number of modules hooked.
    """
    modules = dict(base.named_modules())
    handles = []
    try:
        for key, (a, b) in split_factors(state).items():
            name = key.removeprefix(PEFT_PREFIX)
            if name not in modules:
                raise ValueError(f"global adapter targets '{name}', which the model lacks")
            a32, b32 = a.float(), b.float()

            def hook(_m, inputs, output, a=a32, b=b32):
                return add_low_rank(inputs[0], output, a, b, scaling)

            handles.append(modules[name].register_forward_hook(hook))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
