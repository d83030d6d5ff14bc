"""What a FedSpine device deploys, measured beside the unpruned fine-tuned model, in one run.

For a finished FedSpine run, each `<run>/devices/<client>/` model (pruned 4-bit base + its
cut of the global adapter) and the unpruned one (the 4-bit base + `<run>/adapter`) are
loaded in turn, each in a fresh process, the way a user loads them
(`AutoModelForCausalLM.from_pretrained` + `PeftModel.from_pretrained`, bitsandbytes' CPU
inference path), and generate greedily `--tokens` new tokens for each of `--prompts`
held-out prompts of the run's dataset. Printed per model, with its ratio to the unpruned:
parameters, MB on disk, inference peak RSS (and above the interpreter + imports every
process pays), generated tokens/s, and the held-out loss / answer ranking the run measured.
Each model is measured `--repeats` times, alternating, and the mean is shown.

    .venv/bin/python scripts/bench_deployed.py runs/<fedspine run>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import run_worker

UNPRUNED = "unpruned"


def worker(model_dir: str, adapter_dir: str, tokenizer_dir: str, run_dir: str, prompts: int,
           tokens: int) -> dict:
    """Load one model and generate; the figures as a JSON-able dict."""
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedapp.config import data_spec, load_run_config
    from fedapp.llm.data import encode_prompt, load_split
    from fedapp.llm.memory import peak_rss_mb
    from fedapp.llm.model import disable_bnb_cpu_repack, load_tokenizer
    from fedapp.pruning.surgery import parameter_count
    from fedapp.server.generate import heldout_prompts

    floor = peak_rss_mb()
    cfg = load_run_config(Path(run_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    spec = data_spec(cfg)
    _, test = load_split(spec)
    texts, _ = heldout_prompts(test, spec, tokenizer, prompts)
    floor = max(floor, peak_rss_mb())
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = parameter_count(model)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    load_seconds = time.perf_counter() - start
    # bitsandbytes' CPU inference repack needs every 4-bit layer's output size to be a
    # multiple of 32 (it asserts otherwise): true of real models' pruned units (heads and
    # MLP groups of 64), not of tiny test models, which then run the training path's kernel
    odd = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
           and m.out_features % 32]
    if odd:
        disable_bnb_cpu_repack(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    encoded = [torch.tensor([encode_prompt(text, tokenizer)]) for text in texts]
    with torch.no_grad():
        model.generate(input_ids=encoded[0], attention_mask=torch.ones_like(encoded[0]),
                       max_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up
        start, generated = time.perf_counter(), 0
        for ids in encoded:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False, pad_token_id=pad)
            generated += out.shape[1] - ids.shape[1]
        seconds = time.perf_counter() - start
    disk = sum(p.stat().st_size for folder in (Path(model_dir), Path(adapter_dir))
               for p in folder.glob("*.safetensors"))
    return {"params": params, "disk_mb": disk / 2**20, "load_s": load_seconds,
            "tok_s": generated / seconds, "peak_mb": peak_rss_mb(), "floor_mb": floor,
            "repacked": float(not odd)}


def models(run_dir: Path) -> dict[str, tuple[str, str, str, dict]]:
    """name -> (model folder, adapter folder, tokenizer folder, what the run measured for it);
    the unpruned 4-bit base is the app's prepared copy, which holds no tokenizer."""
    from fedapp.config import load_run_config
    from fedapp.llm.model import default_device, prepared_dir, resolve_model_path

    summary_path = run_dir / "devices" / "summary.json"
    if not summary_path.exists():
        sys.exit(f"{summary_path} does not exist; allowed: the run directory of a finished "
                 "FedSpine run")
    cfg = load_run_config(run_dir)
    if cfg.model.quantization != "nf4":
        sys.exit(f"the run used model.quantization={cfg.model.quantization}; this bench "
                 "measures 4-bit deployments (nf4)")
    source = resolve_model_path(cfg.model.path)
    base = prepared_dir(source, default_device())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
               .splitlines() if line.strip()]
    found = {UNPRUNED: (str(base), str(run_dir / "adapter"), source, metrics[-1])}
    for name, info in json.loads(summary_path.read_text()).items():
        folder = run_dir / "devices" / name
        found[name] = (str(folder), str(folder / "adapter"), str(folder), info)
    return found


def fmt(value: float, ref: float, digits: int = 1) -> str:
    return f"{value:.{digits}f} ({value / ref:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    found = models(args.run_dir.resolve())
    runs: dict[str, list[dict]] = {name: [] for name in found}
    for repeat in range(args.repeats):
        for name, (model_dir, adapter_dir, tokenizer_dir, _) in found.items():
            print(f"[{repeat + 1}/{args.repeats}] {name} ...", file=sys.stderr, flush=True)
            runs[name].append(run_worker(__file__, "--worker", model_dir, adapter_dir,
                                         tokenizer_dir, str(args.run_dir.resolve()),
                                         str(args.prompts),
                                         str(args.tokens)))
    mean = {n: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    ref = mean[UNPRUNED]
    print(f"Deployed models of {args.run_dir} ({args.prompts} prompts x {args.tokens} tokens, "
          f"greedy, CPU, mean of {args.repeats}); ratios to the unpruned fine-tuned model")
    print(f"{'model':<14}{'device':<8}{'sparsity':>9}{'params (M)':>16}{'disk MB':>16}"
          f"{'peak RSS MiB':>17}{'above imports':>16}{'tokens/s':>15}{'eval loss':>10}"
          f"{'rank acc':>9}")
    for name, m in mean.items():
        info = found[name][3]
        above, ref_above = m["peak_mb"] - m["floor_mb"], ref["peak_mb"] - ref["floor_mb"]
        print(f"{name:<14}{info.get('device', '-'):<8}{info.get('reached', 0.0):>9.3f}"
              f"{fmt(m['params'] / 1e6, ref['params'] / 1e6):>16}"
              f"{fmt(m['disk_mb'], ref['disk_mb']):>16}{fmt(m['peak_mb'], ref['peak_mb'], 0):>17}"
              f"{fmt(above, ref_above, 0):>16}{fmt(m['tok_s'], ref['tok_s']):>15}"
              f"{info.get('eval-loss', float('nan')):>10.4f}"
              f"{info.get('eval-rank-accuracy', float('nan')):>9.3f}"
              f"{'' if m['repacked'] else '  (no CPU repack: a layer width is not a multiple of 32)'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, model_dir, adapter_dir, tokenizer_dir, run_dir, prompts, tokens = sys.argv
        print(json.dumps(worker(model_dir, adapter_dir, tokenizer_dir, run_dir, int(prompts),
                                int(tokens))))
    else:
        main()
