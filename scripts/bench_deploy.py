"""Deployment per-round client overhead, before and after the prepared 4-bit checkpoint.

A deployed SuperNode starts a fresh ClientApp process for every message, so every round
pays for the process start (imports) and for loading the model and data again. This runs a
real deployment on 127.0.0.1 (a SuperLink and SuperNodes as separate processes, TLS and
SuperNode authentication) twice in one go, on the default SmolLM2 model:

- before: FEDAPP_PREPARED=0, each process quantises the full-precision weights again;
- after:  the prepared 4-bit copy under the cache (made once up front) is loaded instead;

and prints, per round, the seconds from message received to training start
(`setup-seconds`: model and data loading), averaged over clients, with the before/after
ratio, and the age of the ClientApp process when the message came (`process-start-seconds`).

    .venv/bin/python scripts/bench_deploy.py [--clients 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedapp.llm.model import DEFAULT_MODEL, load_base
from fedapp.server.report import read_metrics
from fedapp.tools.loopback import LoopbackFederation


def deployment_overheads(root: Path, clients: int, rounds: int, prepared: bool) -> list[dict]:
    """Per round: mean setup and process-start seconds over the clients that trained."""
    fed = LoopbackFederation(root, ROOT)
    fed.extra_env = {"FEDAPP_PREPARED": "1" if prepared else "0"}
    try:
        fed.start_superlink()
        fed.start_supernodes(clients)
        overrides = (f"scenario.num_clients={clients} scenario.min_train_nodes={clients} "
                     f"num_rounds={rounds} train.local_steps=2 eval.max_examples=8 "
                     "partitioner=iid")
        fed.submit(overrides, root / "run")
        if fed.wait("submit", timeout=1800) != 0:
            raise RuntimeError(f"the deployed run failed\n{fed.logs()}")
    finally:
        fed.stop_all()
    out = []
    for row in read_metrics(root / "run" / "metrics.jsonl")[1:]:
        ok = [c for c in row["clients"].values() if c.get("status") == "ok"]
        out.append({"round": row["round"],
                    "setup": statistics.fmean(c["setup-seconds"] for c in ok),
                    "process": statistics.fmean(c["process-start-seconds"] for c in ok)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    load_base(DEFAULT_MODEL, "nf4", "cpu")  # makes the prepared copy if it is missing
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prepared in (False, True):
            label = "after (prepared 4-bit)" if prepared else "before (quantise each time)"
            print(f"[bench] deployment, {label}: {args.clients} SuperNodes x {args.rounds} "
                  "rounds", flush=True)
            results[prepared] = deployment_overheads(Path(tmp) / str(prepared), args.clients,
                                                     args.rounds, prepared)
    print("\nper-round client overhead in deployment (mean over clients, seconds)")
    print(f"{'round':>5} {'setup before':>13} {'setup after':>12} {'process age b/a':>17}")
    for before, after in zip(results[False], results[True]):
        print(f"{before['round']:>5} {before['setup']:>13.2f} {after['setup']:>12.2f} "
              f"{before['process']:>8.2f}/{after['process']:<8.2f}")
    mean = {k: statistics.fmean(r["setup"] for r in v) for k, v in results.items()}
    print(f"message received -> training starts: before {mean[False]:.2f} s, after "
          f"{mean[True]:.2f} s per client and round, ratio before/after "
          f"{mean[False] / mean[True]:.2f}x")
    print("(process age = how long the ClientApp process existed before the message came; "
          "the SuperNode starts it ahead of the message, so its imports are not on the "
          "message's path and the age includes idle waiting)")

if __name__ == "__main__":
    main()
