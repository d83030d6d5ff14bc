"""scripts/bench_client.py's memory tables: each variant's peak RSS split into its parts,
and the ratios between variants that ran in the same bench run."""

from __future__ import annotations

PARTS = ("imports", "data", "weights", "lora+optim", "activations", "step rest", "resident rest")
PART_NAMES = {
    "imports": "interpreter + imports", "data": "data pipeline (datasets, tokenizer)",
    "weights": "base weights", "lora+optim": "LoRA + grads + AdamW state",
    "activations": "activations kept for backward", "step rest": "logits/loss, temporaries",
    "resident rest": "allocator slack, caches, other"}


def print_memory(rows: dict[str, dict], steps: int) -> None:
    print(f"\nwhere a client's peak RSS goes, MiB (SmolLM2-135M unless the row says 262k "
          f"vocab or runtime floor; LoRA r8 q/k/v/o, batch 4, seq <= 128, {steps} timed "
          f"steps); columns:")
    for part in PARTS:
        print(f"  {part:>13}: {PART_NAMES[part]}")
    heads = (*PARTS, "= peak", "s/step", "load s", "load peak", "malloc")
    print(f"{'':20}" + "".join(f"{h:>14}" for h in heads))
    for name, row in rows.items():
        cells = [f"{row['parts'][part]:>14.0f}" for part in PARTS]
        cells += [f"{row['peak-rss-mb']:>14.0f}", f"{row['seconds-per-step']:>14.3f}",
                  f"{row['load-seconds']:>14.1f}", f"{row['load-peak-mb']:>14.0f}",
                  f"{row['allocator']:>14}"]
        print(f"{name:20}" + "".join(cells))


def print_ratios(rows: dict[str, dict]) -> None:
    """Every ratio whose two variants ran (`--variants` may pick a few)."""
    peak, step = "peak-rss-mb", "seconds-per-step"
    print("\nratios measured above")
    print("  (peak: the larger of the load and training peaks; loss: the mean training loss "
          "of the timed steps, same batches, a's minus b's)")
    for a, b in (("nf4", "none"), ("nf4 lean", "none lean"), ("nf4-emb lean", "none lean"),
                 ("nf4-emb ckpt+release", "none ckpt+release"), ("nf4-emb+ckpt", "none"),
                 ("nf4-emb+ckpt", "none+ckpt"), ("nf4-emb ckpt+fp32", "none+ckpt"),
                 ("nf4-emb+ckpt pad32", "none+ckpt"), ("nf4-emb+ckpt pad32", "nf4-emb+ckpt"),
                 ("nf4-emb+ckpt pad32", "none+ckpt pad32"), ("none+ckpt pad32", "none+ckpt"),
                 ("nf4 pad32", "nf4"), ("nf4 pad32", "none"),
                 ("nf4-emb", "none"), ("nf4-emb", "nf4"), ("nf4-emb lean", "nf4 lean"),
                 ("nf4 lean", "none"), ("nf4+ckpt", "nf4"), ("nf4+release", "nf4"),
                 ("nf4+fp32", "nf4"),
                 ("nf4 lean", "nf4"), ("none lean", "none"), ("nf4 plain loss", "nf4"),
                 ("262k vocab plain", "262k vocab"), ("nf4", "nf4 glibc"),
                 ("none", "none glibc"), ("nf4-emb+ckpt", "nf4-emb+ckpt glibc"),
                 ("none+ckpt", "none+ckpt glibc"), ("nf4 glibc", "none glibc"),
                 ("nf4-emb+ckpt glibc", "none+ckpt glibc")):
        if a in rows and b in rows:
            top = {k: max(rows[k][peak], rows[k]["load-peak-mb"]) for k in (a, b)}
            print(f"  {a} / {b}: peak RSS {top[a] / top[b]:.3f}x ({top[a]:.0f} / "
                  f"{top[b]:.0f} MiB), s/step {rows[a][step] / rows[b][step]:.2f}x, "
                  f"loss {rows[a]['loss'] - rows[b]['loss']:+.4f}")
    print_pruning_and_loading(rows)


def rest(row: dict) -> float:
    """What the named parts leave of a client's peak: temporaries, slack, runtime."""
    return row["parts"]["step rest"] + row["parts"]["resident rest"]


def by_part(a: dict, b: dict) -> str:
    """a's parts over b's: weights, LoRA + optimizer, activations, the rest."""
    ratios = [f"{part} {a['parts'][part] / b['parts'][part]:.2f}x"
              for part in ("weights", "lora+optim", "activations") if b["parts"][part] > 0]
    if rest(b) > 0:
        ratios.append(f"step + resident rest {rest(a) / rest(b):.2f}x")
    return ", ".join(ratios)


def print_pruning_and_loading(rows: dict[str, dict]) -> None:
    peak, step = "peak-rss-mb", "seconds-per-step"

    def above_floor(row: dict) -> float:
        return row[peak] - row["parts"]["imports"] - row["parts"]["data"]

    floor = rows.get("runtime floor", {}).get(peak)

    for pruned, full in (("nf4 pruned 0.5", "nf4"), ("nf4 pruned lean", "nf4 lean"),
                         ("nf4-emb pruned 0.5", "nf4-emb"), ("nf4 pruned 0.5 stored", "nf4"),
                         ("nf4-emb pruned 0.5 stored", "nf4-emb")):
        if pruned not in rows or full not in rows:
            continue
        p, f = rows[pruned], rows[full]
        print(f"  {pruned} / {full}: parameters {p['params-ratio']:.3f}x, peak RSS "
              f"{p[peak] / f[peak]:.2f}x (above the imports + data floor "
              f"{above_floor(p) / above_floor(f):.2f}x), s/step {p[step] / f[step]:.2f}x")
        if floor is not None:
            print(f"    above the runtime floor ({floor:.0f} MiB, the 'runtime floor' variant's"
                  f" peak) {(p[peak] - floor) / (f[peak] - floor):.2f}x; by part: "
                  f"{by_part(p, f)}")
        if p.get("prune-peak-mb"):  # a device's first pruned round: the unpruned model first
            print(f"    its first pruned round: peak through loading and the scoring pass on "
                  f"the unpruned model {p['prune-peak-mb']:.0f} MiB "
                  f"({p['prune-peak-mb'] / f[peak]:.2f}x the unpruned client's training peak; "
                  f"scoring and slicing {p['prune-seconds']:.1f} s)")
    if not {"nf4 quantised here", "nf4 1st run", "nf4"} <= rows.keys():
        return
    here, first, full = rows["nf4 quantised here"], rows["nf4 1st run"], rows["nf4"]
    print(f"  load peak RSS: quantising in the client's process {here['load-peak-mb']:.0f} MiB"
          f" (training peak {here[peak]:.0f}), first run with a helper process "
          f"{first['load-peak-mb']:.0f} MiB (training peak {first[peak]:.0f}; load "
          f"{first['load-seconds']:.1f} s), prepared copy {full['load-peak-mb']:.0f} MiB")
