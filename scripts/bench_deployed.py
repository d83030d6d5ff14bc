"""What a FedSpine device deploys, measured beside the unpruned fine-tuned model, in one run.

For a finished FedSpine run, each `<run>/devices/<client>/` model (pruned 4-bit base + its
cut of the global adapter) and the unpruned one (the 4-bit base + `<run>/adapter`) are
loaded in turn, each in a fresh process, the way a user loads them
(`AutoModelForCausalLM.from_pretrained`, or `fedapp.llm.unequal` for a global prune's unequal
layers, + `PeftModel.from_pretrained`, bitsandbytes' CPU
inference path), and generate greedily `--tokens` new tokens for each of `--prompts`
held-out prompts of the run's dataset (batch 1), then process a `--prefill`-token prompt
in one forward. Printed per model, with its ratio to the unpruned: parameters, MB on disk,
peak RSS while generating (and above the interpreter + imports every process pays),
decoding and prefill tokens/s, the held-out loss of the model as loaded (the run's
held-out examples) and the loss / answer ranking the run measured. A second table splits
a decoding step: ms per decoded token with and without the LoRA, the 4-bit layers' ops
(calls, ms, µs per call) and the rest (layer calls, norms, attention, the head, generate),
and the decoding throughput of `--batch` prompts generated together (left-padded), where
the per-call costs are shared by the batch. Each model is measured `--repeats` times,
alternating, and the mean is shown; `--models` picks some of the devices.

    .venv/bin/python scripts/bench_deployed.py runs/<fedspine run>
    .venv/bin/python scripts/bench_deployed.py runs/<fedspine run> --models partition-0 --batch 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import run_worker

UNPRUNED = "unpruned"
NO_REPACK = "  (no CPU repack: a layer width is not a multiple of 32)"


def worker(model_dir: str, adapter_dir: str, tokenizer_dir: str, run_dir: str, prompts: int,
           tokens: int, prefill: int, batch: int) -> dict:
    """Load one model, generate, time its prefill and parts of a decoding step and
    evaluate its held-out loss; the figures as a JSON-able dict."""
    import bitsandbytes as bnb
    from peft import PeftModel

    from fedapp.config import data_spec, load_run_config
    from fedapp.llm.data import encode_prompt, load_split
    from fedapp.llm.memory import peak_rss_mb
    from fedapp.llm.model import disable_bnb_cpu_repack, load_tokenizer
    from fedapp.llm.train import eval_loss
    from fedapp.pruning.surgery import parameter_count
    from fedapp.server.evaluate import heldout_examples
    from fedapp.server.generate import heldout_prompts

    floor = peak_rss_mb()
    cfg = load_run_config(Path(run_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    spec = data_spec(cfg)
    _, test = load_split(spec)
    texts, _ = heldout_prompts(test, spec, tokenizer, prompts)
    floor = max(floor, peak_rss_mb())
    start = time.perf_counter()
    model = load_model(model_dir)
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
    peak = peak_rss_mb()  # of generation: the prefill and loss below hold longer inputs
    figures = {"params": params, "disk_mb": disk_mb(model_dir, adapter_dir),
               "load_s": load_seconds, "tok_s": generated / seconds, "peak_mb": peak,
               "floor_mb": floor, "repacked": float(not odd)}
    prompt = torch.cat(encoded, dim=1)  # the held-out prompts, repeated to `prefill` tokens
    prompt = prompt.repeat(1, -(-prefill // prompt.shape[1]))[:, :prefill]
    examples = heldout_examples(spec, tokenizer, cfg.train.max_length, cfg.eval.max_examples)
    return figures | decode_parts(model, encoded[0], tokens, pad) | {
        "batch_tok_s": batched_tok_s(model, encoded, tokens, pad, batch),
        "prefill_tok_s": prefill / prefill_seconds(model, prompt),
        "loss": eval_loss(model, examples, cfg.eval.batch_size, pad)}


def load_model(model_dir: str) -> torch.nn.Module:
    """A model folder as a user loads it: plain transformers, or `fedapp.llm.unequal` for a
    global prune's unequal layers (no stock config)."""
    from transformers import AutoModelForCausalLM

    from fedapp.llm.unequal import load_unequal, unequal_config

    unequal = unequal_config(Path(model_dir))
    return AutoModelForCausalLM.from_pretrained(model_dir) if unequal is None else \
        load_unequal(Path(model_dir), unequal)


def disk_mb(*folders: str) -> float:
    return sum(p.stat().st_size for folder in folders
               for p in Path(folder).glob("*.safetensors")) / 2**20


def decode_parts(model: torch.nn.Module, ids: torch.Tensor, tokens: int, pad: int,
                 repeats: int = 3) -> dict[str, float]:
    """Where a decoding step's time goes, for one prompt: ms per decoded token with the
    adapter and without it (peft's `disable_adapter`: the LoRA's share), and under the torch
    profiler, the 4-bit layers' ops (outermost bitsandbytes ops, their children included:
    calls and ms per token). Each is a generation of `tokens` minus one of 1 token, so the
    prompt's own forward is left out; times are the median of `repeats`."""
    from torch.profiler import ProfilerActivity, profile

    mask = torch.ones_like(ids)

    def per_token() -> float:
        return 1e3 * decode_seconds(model, ids, mask, tokens, pad, repeats) / (tokens - 1)

    def kernels(n: int) -> tuple[float, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate_seconds(model, ids, mask, n, pad)
        outer = [e for e in prof.events() if e.name.startswith("bitsandbytes::") and not (
            e.cpu_parent is not None and e.cpu_parent.name.startswith("bitsandbytes::"))]
        return sum(e.cpu_time_total for e in outer) / 1e3, len(outer)

    with torch.no_grad():
        with_adapter = per_token()
        with model.disable_adapter():
            without = per_token()
        (ms, calls), (ms_1, calls_1) = kernels(tokens), kernels(1)
    return {"step_ms": with_adapter, "no_lora_ms": without,
            "kernel_ms": (ms - ms_1) / (tokens - 1),
            "kernel_calls": (calls - calls_1) / (tokens - 1)}


def batched_tok_s(model: torch.nn.Module, encoded: list[torch.Tensor], tokens: int, pad: int,
                  batch: int, repeats: int = 3) -> float:
    """Decoded tokens per second of `batch` prompts (the held-out ones, cycled) generated
    together, left-padded: batch · (tokens - 1) over a generation of `tokens` minus one of 1
    (the prompts' forward left out), the median of `repeats`."""
    rows = [encoded[i % len(encoded)][0] for i in range(batch)]
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1

    with torch.no_grad():
        generate_seconds(model, ids, mask, 2, pad)  # warm-up at this batch's shapes
        return batch * (tokens - 1) / decode_seconds(model, ids, mask, tokens, pad, repeats)


def generate_seconds(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int,
                     pad: int) -> float:
    """Seconds of a greedy generation of exactly `n` new tokens after `ids`."""
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                   min_new_tokens=n, pad_token_id=pad)
    return time.perf_counter() - start


def decode_seconds(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                   tokens: int, pad: int, repeats: int) -> float:
    """Seconds of decoding `tokens` - 1 tokens: a generation of `tokens` minus one of 1
    (the prompt's forward left out), the median of `repeats`."""
    return statistics.median(generate_seconds(model, ids, mask, tokens, pad)
                             - generate_seconds(model, ids, mask, 1, pad)
                             for _ in range(repeats))


def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    """Seconds of one forward over the prompt `ids` (the fastest of `repeats`, after a
    warm-up), keeping only the last position's logits, as generation's first step does."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return min(times[1:])


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
    ratio = f"{value / ref:.2f}x" if ref else "-"
    return f"{value:.{digits}f} ({ratio})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prefill", type=int, default=256,
                        help="prompt tokens of the prefill (prompt processing) measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8,
                        help="prompts decoded together for the batched throughput")
    parser.add_argument("--models", help="comma-separated devices (default: all); the "
                        "unpruned model is always measured")
    args = parser.parse_args()
    check_args(args)
    found = pick(models(args.run_dir.resolve()), args.models)
    runs: dict[str, list[dict]] = {name: [] for name in found}
    for repeat in range(args.repeats):
        for name, (model_dir, adapter_dir, tokenizer_dir, _) in found.items():
            print(f"[{repeat + 1}/{args.repeats}] {name} ...", file=sys.stderr, flush=True)
            runs[name].append(run_worker(__file__, "--worker", model_dir, adapter_dir,
                                         tokenizer_dir, str(args.run_dir.resolve()),
                                         str(args.prompts), str(args.tokens),
                                         str(args.prefill), str(args.batch)))
    mean = {n: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    print(f"Deployed models of {args.run_dir} ({args.prompts} prompts x {args.tokens} tokens, "
          f"greedy, batch 1; batched: {args.batch} prompts together; prefill of "
          f"{args.prefill} prompt tokens; CPU, mean of {args.repeats}); ratios to the "
          "unpruned fine-tuned model")
    print_table(mean, found)
    print_decoding(mean)


def check_args(args: argparse.Namespace) -> None:
    """Exit naming the first argument outside what the measurements allow."""
    for name, least in (("prompts", 1), ("tokens", 2), ("prefill", 1), ("repeats", 1),
                        ("batch", 1)):
        if getattr(args, name) < least:
            sys.exit(f"--{name}={getattr(args, name)}; allowed: an integer >= {least}")


def pick(found: dict[str, tuple], names: str | None) -> dict[str, tuple]:
    """The unpruned model and the devices `names` (comma-separated; None: all)."""
    if names is None:
        return found
    wanted = [n.strip() for n in names.split(",")]
    if unknown := [n for n in wanted if n not in found or n == UNPRUNED]:
        sys.exit(f"--models {unknown}; allowed: {[n for n in found if n != UNPRUNED]}")
    return {n: v for n, v in found.items() if n == UNPRUNED or n in wanted}


def print_decoding(mean: dict[str, dict]) -> None:
    """Where a decoding step's time goes, per model, with ratios to the unpruned model."""
    print("\nDecoding, per decoded token (one prompt, the prompt's forward left out, median "
          "of 3; the 4-bit layers' ops timed under the torch profiler, which adds its own "
          "cost per call; rest = without LoRA minus 4-bit ops):")
    print(f"{'model':<14}{'ms/token':>15}{'without LoRA':>15}{'4-bit ops ms':>15}"
          f"{'calls':>7}{'us per call':>12}{'rest ms':>15}")
    ref = mean[UNPRUNED]
    ref_rest = ref["no_lora_ms"] - ref["kernel_ms"]
    for name, m in mean.items():
        rest = m["no_lora_ms"] - m["kernel_ms"]
        per_call = f"{1e3 * m['kernel_ms'] / m['kernel_calls']:.1f}" if m["kernel_calls"] else "-"
        print(f"{name:<14}{fmt(m['step_ms'], ref['step_ms'], 2):>15}"
              f"{fmt(m['no_lora_ms'], ref['no_lora_ms'], 2):>15}"
              f"{fmt(m['kernel_ms'], ref['kernel_ms'], 2):>15}{m['kernel_calls']:>7.0f}"
              f"{per_call:>12}{fmt(rest, ref_rest, 2):>15}")


def print_table(mean: dict[str, dict], found: dict[str, tuple]) -> None:
    """One row per model: its figures and their ratio to the unpruned model's; `loss` is
    the held-out loss of the model as loaded here, `run loss` what the run measured."""
    ref = mean[UNPRUNED]
    print(f"{'model':<14}{'device':<8}{'sparsity':>9}{'params (M)':>16}{'disk MB':>16}"
          f"{'peak RSS MiB':>17}{'above imports':>16}{'decode tok/s':>15}"
          f"{'batched tok/s':>17}{'prefill tok/s':>17}{'loss':>8}{'run loss':>9}{'rank acc':>9}")
    for name, m in mean.items():
        info = found[name][3]
        above, ref_above = m["peak_mb"] - m["floor_mb"], ref["peak_mb"] - ref["floor_mb"]
        print(f"{name:<14}{info.get('device', '-'):<8}{info.get('reached', 0.0):>9.3f}"
              f"{fmt(m['params'] / 1e6, ref['params'] / 1e6):>16}"
              f"{fmt(m['disk_mb'], ref['disk_mb']):>16}{fmt(m['peak_mb'], ref['peak_mb'], 0):>17}"
              f"{fmt(above, ref_above, 0):>16}{fmt(m['tok_s'], ref['tok_s']):>15}"
              f"{fmt(m['batch_tok_s'], ref['batch_tok_s']):>17}"
              f"{fmt(m['prefill_tok_s'], ref['prefill_tok_s'], 0):>17}{m['loss']:>8.4f}"
              f"{info.get('eval-loss', float('nan')):>9.4f}"
              f"{info.get('eval-rank-accuracy', float('nan')):>9.3f}"
              f"{'' if m['repacked'] else NO_REPACK}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, model_dir, adapter_dir, tokenizer_dir, run_dir, *sizes = sys.argv
        prompts, tokens, prefill, batch = map(int, sizes)
        print(json.dumps(worker(model_dir, adapter_dir, tokenizer_dir, run_dir, prompts,
                                tokens, prefill, batch)))
    else:
        main()
