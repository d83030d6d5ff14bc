"""FLoRA's downlink, exact against capped, on the default run: bytes each way per client and
round, and the held-out losses.

Per seed, two real `flwr run` simulations of the default scenario (SmolLM2-135M 4-bit, four
clients of ranks 4, 8, 16, 8, rank budget 64, the default rounds and evaluation), the same
in everything but the downlink:

    exact    `strategy.downlink_cap=null`: all of G, or the exact increment of a client
             that uploaded last round (`strategies.flora`)
    capped   `strategy.downlink_cap=<--cap>`: a returning client whose exact form would
             exceed cap × its last upload gets the best low-rank correction of what it
             holds (`strategies.downlink_math`)

Printed per method and round: each client's bytes down / its previous upload, and its lag
‖G − H‖ / ‖G‖ (capped); the held-out loss per round (mean over seeds, each seed's value)
and capped − exact. Writes `<out>/downlink.md`.

    .venv/bin/python scripts/bench_downlink.py                 # seeds 0 1, cap 2
    .venv/bin/python scripts/bench_downlink.py --report runs/bench-downlink/<stamp>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_fedspine import federated

METHODS = ("exact", "capped")
LOSS = "eval-loss"


def load(out: Path) -> dict[str, dict[int, list[dict]]]:
    from fedapp.server.report import read_metrics

    runs: dict[str, dict[int, list[dict]]] = {}
    for run_dir in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists()):
        method, seed = run_dir.name.rsplit("-seed", 1)
        if method not in METHODS:
            sys.exit(f"{run_dir}: not a run of this bench (allowed: {METHODS})")
        runs.setdefault(method, {})[int(seed)] = read_metrics(run_dir / "metrics.jsonl")
    return runs


def traffic(rows: list[dict]) -> list[tuple[int, str, float, float, float | None]]:
    """(round, client, bytes down, its upload of the round before, lag) of every client
    that also uploaded in the round before (a returning client: where the cap applies)."""
    out, last_up = [], {}
    for row in rows:
        for name, c in sorted(row.get("clients", {}).items()):
            if name in last_up:
                out.append((row["round"], name, c["bytes-down"], last_up[name],
                            c.get("downlink-lag")))
            if c.get("status") == "ok":
                last_up[name] = c["bytes-up"]
            else:
                last_up.pop(name, None)
    return out


def report(out: Path) -> str:
    runs = load(out)
    if set(runs) != set(METHODS):
        sys.exit(f"{out} holds {sorted(runs)}; the report needs both of {METHODS}")
    seeds = sorted(set(runs["exact"]) & set(runs["capped"]))
    lines = [f"# FLoRA downlink: exact vs capped ({out.name})", "",
             (f"Seeds {seeds}. Bytes down of a returning client (whole train message) over its "
             "upload of the round before; lag = ‖G − H‖_F / ‖G‖_F of the copy it trained "
             "beside (0: exact)."), ""]
    for method in METHODS:
        rows = runs[method][seeds[0]]
        lines += [f"## {method} (seed {seeds[0]})", "",
                  "| round | client | MB down | MB up before | down / up | lag |",
                  "|---|---|---|---|---|---|"]
        ratios = []
        for rnd, name, down, up, lag in traffic(rows):
            ratios.append(down / up)
            lag_text = "-" if lag is None else f"{lag:.4f}"
            lines.append(f"| {rnd} | {name} | {down / 1e6:.3f} | {up / 1e6:.3f} | "
                         f"{down / up:.2f} | {lag_text} |")
        if ratios:
            lines += ["", (f"Largest down / up of a returning client: {max(ratios):.2f}x; "
                      f"all returning clients' bytes down: "
                      f"{sum(t[2] for t in traffic(rows)) / 1e6:.2f} MB"), ""]
    lines += ["## Held-out loss per round", "",
              "| round | exact | capped | capped − exact |", "|---|---|---|---|"]
    rounds = [r["round"] for r in runs["exact"][seeds[0]] if LOSS in r]
    for rnd in rounds:
        per = {m: [next(r[LOSS] for r in runs[m][s] if r["round"] == rnd) for s in seeds]
               for m in METHODS}
        diffs = [c - e for c, e in zip(per["capped"], per["exact"], strict=True)]
        lines.append(f"| {rnd} | " + " | ".join(
            f"{statistics.mean(per[m]):.4f} {[round(v, 4) for v in per[m]]}" for m in METHODS)
            + f" | {statistics.mean(diffs):+.4f} {[round(d, 4) for d in diffs]} |")
    text = "\n".join(lines) + "\n"
    (out / "downlink.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--cap", type=float, default=2.0)
    parser.add_argument("--overrides", default="", help="Hydra overrides for both methods")
    parser.add_argument("--report", type=Path, default=None, help="only report this folder")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-downlink")
    args = parser.parse_args()
    if args.report is not None:
        print(report(args.report.resolve()))
        return
    out = (args.out / time.strftime("%Y%m%d-%H%M%S")).resolve()
    caps = {"exact": "null", "capped": args.cap}
    for seed in args.seeds:
        for method in METHODS:
            federated(method, f"strategy=flora strategy.downlink_cap={caps[method]} "
                      f"seed={seed} {args.overrides}", out / f"{method}-seed{seed}")
    print(report(out))


if __name__ == "__main__":
    main()
