"""Each FedSpine device's deployed model: written at the end of a run, evaluated, loadable in
one call.

A device's model is the base pruned to the structure it reached (`fedapp.pruning.units`:
slicing only; 4-bit MLP channels go in whole quantisation blocks, so the kept weights keep
their 4-bit codes) with the final global update G cut to its kept units. Every layer keeps
the same shapes, so the folder holds a stock config (`num_key_value_heads`,
`num_attention_heads`, `head_dim`, `intermediate_size` changed), the 4-bit weights as
bitsandbytes serialises them and the tokenizer; G is a standard peft LoRA in `adapter/`,
whose config names the model folder (its absolute path at export):

    model = AutoPeftModelForCausalLM.from_pretrained("<run>/devices/<client>/adapter")

(peft; the LoRA stays fp32, exactly what the server evaluated. Moved elsewhere, the same
takes two steps: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder),
folder / "adapter")`. transformers' own adapter loading also works on `adapter/` but casts
the LoRA to the 4-bit compute dtype, bf16: logits within ~1e-3.) `devices/summary.json`
lists per device its class, target and reached sparsity, parameters (and their ratio to
the unpruned model), bytes on disk and held-out loss / answer ranking.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log
from safetensors.torch import save_file

from fedapp.client.pruned import slice_global
from fedapp.llm.model import load_base
from fedapp.pruning.surgery import parameter_count
from fedapp.pruning.units import apply_units, stock_config
from fedapp.server.evaluate import export_adapter

Adapter = tuple[Mapping[str, torch.Tensor], int, float]  # (state, r, lora_alpha)


def save_model(model: torch.nn.Module, config: object, out_dir: Path) -> None:
    """The model's weights (4-bit ones with their quantisation state, tied ones once) and
    `config` as a folder `from_pretrained` loads. transformers 5 cannot re-save a model it
    loaded pre-quantised (no reverse weight conversion), so the state dict is written here."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tied = getattr(config, "tie_word_embeddings", False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    config.use_cache = True
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def export_device(model_path: str, quantization: str, units: Mapping[str, list[int]],
                  adapter: Adapter, out_dir: Path, tokenizer,
                  evaluate: Callable[[torch.nn.Module, Mapping, int, float], dict] | None
                  ) -> dict[str, float]:
    """Write one device's deployed model to `out_dir`; its parameters, bytes on disk and
    `evaluate(pruned base, G cut to it, r, lora_alpha)`'s figures."""
    state, r, alpha = adapter
    base = load_base(model_path, quantization, "cpu")
    full = parameter_count(base)
    kept = {k: torch.tensor(v, dtype=torch.long) for k, v in units.items()}
    result = apply_units(base, kept) if kept else None
    cut = slice_global(state, result) if result is not None else dict(state)
    save_model(base, stock_config(base), out_dir)
    tokenizer.save_pretrained(out_dir)
    if cut:
        export_adapter(base, cut, r, alpha, out_dir / "adapter", str(out_dir.resolve()))
    figures = {"params": float(parameter_count(base)),
               "params-ratio": parameter_count(base) / full,
               "disk-mb": sum(p.stat().st_size for p in out_dir.iterdir()
                              if p.suffix == ".safetensors") / 2**20}
    if evaluate is not None:
        figures |= evaluate(base, cut, r, alpha)
    return figures


def export_deployments(deployments: Mapping[str, dict], model_path: str, quantization: str,
                       adapter: Adapter, out_dir: Path, tokenizer,
                       evaluate: Callable[[torch.nn.Module, Mapping, int, float], dict] | None
                       ) -> dict[str, dict]:
    """Every device's deployed model under `out_dir/<client name>`, and `summary.json`."""
    summary = {}
    for name, info in sorted(deployments.items()):
        figures = export_device(model_path, quantization, info["units"], adapter,
                                out_dir / name, tokenizer, evaluate)
        summary[name] = {k: info[k] for k in ("device", "target", "reached")} | figures
        loss = f", held-out loss {figures['eval-loss']:.4f}" if "eval-loss" in figures else ""
        log(INFO, "Deployed model of %s (%s): sparsity %.3f (target %.3f), %.3f of the "
            "parameters, %.1f MB on disk%s -> %s", name, info["device"], info["reached"],
            info["target"], figures["params-ratio"], figures["disk-mb"], loss, out_dir / name)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
