"""Each FedSpine device's deployed model: written at the end of a run, evaluated, loadable in
one call.

A device's model is the base pruned to the structure it reached (`fedapp.pruning.units`:
slicing only; 4-bit MLP channels go in whole quantisation blocks, so the kept weights keep
their 4-bit codes) with the adapter it holds cut to its kept units: the global update G of
its last round (in the wire dtype; it was sent cut to the same structure) with its own
update of that round stacked beside it at full weight (what the device ended the round
with; checkpoints keep it, so a resumed run too). The final G cut to it is evaluated
beside (`global-eval-loss`, ...). With the default allocation (`strategy.prune.allocation:
uniform`) every layer keeps the same shapes, so the folder holds a stock config
(`num_key_value_heads`, `num_attention_heads`, `head_dim`, `intermediate_size` changed), the
4-bit weights as bitsandbytes serialises them and the tokenizer; G is a standard peft LoRA
in `adapter/`, whose config names the model folder (its absolute path at export):

    model = AutoPeftModelForCausalLM.from_pretrained("<run>/devices/<client>/adapter")

(peft; the LoRA stays fp32, exactly what the server evaluated. Moved elsewhere, the same
takes two steps: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder),
folder / "adapter")`. transformers' own adapter loading also works on `adapter/` but casts
the LoRA to the 4-bit compute dtype, bf16: logits within ~1e-3.) With
`allocation: global` layers keep different shapes, which no stock config holds: the config
lists them (`fedapp.llm.unequal.LAYER_SHAPES`) and the model loads with

    model = fedapp.llm.unequal.load_pretrained("<run>/devices/<client>")

(which loads a stock folder too, adapter included). `devices/summary.json` lists per device
its class, target and reached sparsity, parameters (and their ratio to the unpruned
model), bytes on disk and held-out loss / answer ranking.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log

from fedapp.client.pruned import slice_global
from fedapp.llm.model import load_base, save_model
from fedapp.pruning.surgery import parameter_count
from fedapp.pruning.units import apply_units, saved_config
from fedapp.server.evaluate import export_adapter
from strategies.lora_math import rank_of, split_factors

Adapter = tuple[Mapping[str, torch.Tensor], int, float]  # (state, r, lora_alpha)


def export_device(model_path: str, quantization: str, units: Mapping[str, list[int]],
                  adapter: Adapter, out_dir: Path, tokenizer,
                  evaluate: Callable[[torch.nn.Module, Mapping, int, float], dict] | None,
                  compare: Adapter | None = None) -> dict[str, float]:
    """Write one device's deployed model (its structure + `adapter`) to `out_dir`; its
    parameters, bytes on disk and `evaluate(pruned base, adapter cut to it, r,
    lora_alpha)`'s figures, and those of `compare` cut to it, prefixed "global-"."""
    state, r, alpha = adapter
    # the exported model keeps the stock layout (plain transformers loads it; unequal
    # layers: fedapp.llm.unequal): an embedding quantised for training only
    # (nf4-embeddings) is exported as it was loaded
    base = load_base(model_path, "nf4" if quantization == "nf4-embeddings" else quantization,
                     "cpu")
    full = parameter_count(base)
    kept = {k: torch.tensor(v, dtype=torch.long) for k, v in units.items()}
    result = apply_units(base, kept) if kept else None
    cut = slice_global(state, result) if result is not None else dict(state)
    save_model(base, saved_config(base), out_dir)
    tokenizer.save_pretrained(out_dir)
    if cut:
        export_adapter(base, cut, r, alpha, out_dir / "adapter", str(out_dir.resolve()))
    figures = {"params": float(parameter_count(base)),
               "params-ratio": parameter_count(base) / full,
               "disk-mb": sum(p.stat().st_size for p in out_dir.iterdir()
                              if p.suffix == ".safetensors") / 2**20}
    if evaluate is not None:
        figures |= evaluate(base, cut, r, alpha)
        if compare is not None:
            other = slice_global(compare[0], result) if result is not None else compare[0]
            figures |= {f"global-{k}": v for k, v in evaluate(
                base, other, compare[1], compare[2]).items()}
    return figures


def export_deployments(deployments: Mapping[str, dict], model_path: str, quantization: str,
                       adapter: Adapter, out_dir: Path, tokenizer,
                       evaluate: Callable[[torch.nn.Module, Mapping, int, float], dict] | None
                       ) -> dict[str, dict]:
    """Every device's deployed model under `out_dir/<client name>`, and `summary.json`."""
    summary = {}
    for name, info in sorted(deployments.items()):
        own, compare = adapter, None
        if held := info.get("held"):  # what the device holds; G_T is evaluated beside it
            rank = rank_of(split_factors(held))
            own, compare = (held, rank, float(rank)), adapter
        figures = export_device(model_path, quantization, info["units"], own,
                                out_dir / name, tokenizer, evaluate, compare)
        summary[name] = {k: info[k] for k in ("device", "target", "reached")} | figures
        loss = f", held-out loss {figures['eval-loss']:.4f}" if "eval-loss" in figures else ""
        if "global-eval-loss" in figures:
            loss += f" (with the final global adapter: {figures['global-eval-loss']:.4f})"
        log(INFO, "Deployed model of %s (%s): sparsity %.3f (target %.3f), %.3f of the "
            "parameters, %.1f MB on disk%s -> %s", name, info["device"], info["reached"],
            info["target"], figures["params-ratio"], figures["disk-mb"], loss, out_dir / name)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class DeployedEvaluator:
    """Evaluates every device's deployed model (structure + the adapter it holds) during a
    run, for the time-to-target of deployed quality (`eval.deployed_every`). The pruned
    bases are kept by structure (the last `keep`), so a device whose structure did not
    change is not sliced again."""

    def __init__(self, model_path: str, quantization: str,
                 evaluate: Callable[[torch.nn.Module, Mapping, int, float], dict],
                 keep: int = 8) -> None:
        self.model_path, self.quantization, self.evaluate = model_path, quantization, evaluate
        self.keep, self.bases = keep, {}

    def base_for(self, units: Mapping[str, list[int]]) -> tuple[torch.nn.Module, object]:
        key = tuple((k, tuple(v)) for k, v in sorted(units.items()))
        if key not in self.bases:
            base = load_base(self.model_path, self.quantization, "cpu")
            kept = {k: torch.tensor(v, dtype=torch.long) for k, v in units.items()}
            self.bases[key] = (base, apply_units(base, kept) if kept else None)
            while len(self.bases) > self.keep:
                self.bases.pop(next(iter(self.bases)))
        return self.bases[key]

    def __call__(self, deployments: Mapping[str, dict], adapter: Adapter) -> dict[str, float]:
        """Per device its figures ("<client>/eval-loss", ...), and their mean and worst
        ("deployed-eval-loss-mean" / "-worst", the same for answer-ranking accuracy)."""
        out: dict[str, float] = {}
        for name, info in sorted(deployments.items()):
            base, result = self.base_for(info["units"])
            state, r, alpha = adapter
            if held := info.get("held"):
                rank = rank_of(split_factors(held))
                state, r, alpha = held, rank, float(rank)
            cut = slice_global(state, result) if result is not None else dict(state)
            out |= {f"{name}/{k}": v for k, v in self.evaluate(base, cut, r, alpha).items()}
        for metric, worst in (("eval-loss", max), ("eval-rank-accuracy", min)):
            values = [v for k, v in out.items() if k.endswith("/" + metric)]
            if values:
                out[f"deployed-{metric}-mean"] = sum(values) / len(values)
                out[f"deployed-{metric}-worst"] = worst(values)
        return out
