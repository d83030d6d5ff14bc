"""A deployment under faults: many SuperNodes over TLS with node auth, on 127.0.0.1.

Each case starts its own federation (`fedapp.tools.loopback`: a SuperLink with TLS and
SuperNode authentication, `--nodes` SuperNodes as separate processes) and runs FLoRA on the
tiny test model (tests/tiny.py) for `--rounds` rounds, every online node training:

- undisturbed: nothing happens; the reference for the other cases;
- nodes-restarted: SuperNodes 0 and 1 are killed (SIGKILL, with their app processes) while
  round 2 trains, and started again 5 s later with the same keys;
- silent-node: SuperNode 2 freezes (SIGSTOP) as round 1 starts and never answers again;
- late-node: SuperNode 3's app process freezes as it starts training in round 1 while the
  SuperNode stays connected, and resumes once the server has moved on to round 2: its reply
  comes too late (Flower refuses the upload of a task whose heartbeats stopped);
- superlink-restart: the SuperLink (and the ServerApp it runs) is killed after round 1's
  checkpoint, started again on the same port and state, and the run is resubmitted with
  `resume=<run dir>`. The math says its final adapter must equal the undisturbed one.

Per case it prints the rounds completed, the rounds lost (rounds missing from metrics.jsonl
plus extra attempts of a round), the accepted replies per round, what became of the disturbed
nodes, the wall time, and for superlink-restart the largest difference of each module's
B @ A from the undisturbed run's. A markdown table goes to `<out>/faults.md`.

    .venv/bin/python scripts/bench_faults.py [--nodes 20] [--rounds 3] [--cases ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from safetensors.torch import load_file

from fedapp.server.checkpoint import CHECKPOINT
from fedapp.server.report import read_metrics
from fedapp.tools.loopback import LoopbackFederation
from strategies.lora_math import split_factors

CASES = ("undisturbed", "nodes-restarted", "silent-node", "late-node", "superlink-restart")


def wait_until(check, what: str, fed: LoopbackFederation, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen in {timeout:.0f} s\n{fed.logs()}")
        time.sleep(0.5)


def in_log(fed: LoopbackFederation, name: str, text: str) -> bool:
    try:
        return text in fed.log(name)
    except FileNotFoundError:
        return False


def checkpointed_round(run_dir: Path) -> int:
    try:
        return int(torch.load(run_dir / CHECKPOINT, weights_only=False)["server_round"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def disturb(case: str, fed: LoopbackFederation, nodes: int, run_dir: Path, overrides: str,
            timeout: float) -> str:
    """Do what `case` does to the running federation; a line saying what was done."""
    if case == "nodes-restarted":
        wait_until(lambda: in_log(fed, "submit", "[ROUND 2/"), "round 2", fed, timeout)
        wait_until(lambda: in_log(fed, "supernode-0", "Client 0: ") and
                   fed.log("supernode-0").count("Client 0: ") >= 2, "node 0 training round 2",
                   fed, timeout)
        for i in (0, 1):
            fed.kill(f"supernode-{i}")
        time.sleep(5)
        for i in (0, 1):
            fed.start_supernode(i, nodes)
        return "SuperNodes 0, 1 killed in round 2, restarted 5 s later"
    if case == "silent-node":
        wait_until(lambda: in_log(fed, "submit", "[ROUND 1/"), "round 1", fed, timeout)
        fed.freeze("supernode-2")
        return "SuperNode 2 frozen from round 1 on"
    if case == "late-node":
        wait_until(lambda: in_log(fed, "supernode-3", "Client 3: "), "node 3 training", fed,
                   timeout)
        fed.freeze("supernode-3", only="flwr-clientapp")
        wait_until(lambda: in_log(fed, "submit", "[ROUND 2/"), "round 2", fed, 2 * timeout)
        fed.freeze("supernode-3", frozen=False, only="flwr-clientapp")
        return "SuperNode 3's app frozen while training round 1, resumed in round 2"
    if case == "superlink-restart":
        wait_until(lambda: checkpointed_round(run_dir) >= 1, "round 1's checkpoint", fed,
                   timeout)
        port = int(fed.address.rsplit(":", 1)[1])
        fed.kill("superlink")
        fed.kill("submit")  # the operator's CLI: it would keep asking a dead SuperLink
        done = checkpointed_round(run_dir)
        fed.start_superlink(port)
        # an operator resubmits once the run's min_train_nodes are back; the resumed run
        # waits up to scenario.wait_seconds for the rest itself (the SuperNodes reconnect
        # with back-off, which on 2 cores took over 180 s for the 20th)
        fed.wait_online(nodes // 2, timeout=300)
        back = fed.online_nodes()
        fed.submit(f"resume={run_dir}", run_dir, name="resubmit")
        return (f"SuperLink killed after round {done}, restarted, run resumed with {back}/"
                f"{nodes} SuperNodes back")
    return "nothing"


def run_case(case: str, root: Path, model: Path, nodes: int, rounds: int,
             round_timeout: float, in_memory: bool, extra: str = "") -> dict:
    fed = LoopbackFederation(root / case, ROOT)
    run_dir = root / case / "run"
    overrides = (f"model.path={model} scenario.num_clients={nodes} scenario.min_train_nodes="
                 f"{nodes // 2} scenario.min_replies={nodes // 2} partitioner=iid "
                 f"num_rounds={rounds} train.local_steps=2 train.max_length=64 "
                 "train.batch_size=2 strategy.ranks=[2,4] eval.max_examples=16 "
                 "eval.ranking_examples=0 eval.generate_examples=0 "
                 f"round_timeout={round_timeout:.0f} scenario.wait_seconds=600 {extra}")
    start = time.monotonic()
    try:
        # Only a restarted SuperLink needs its state on disk (the registered SuperNodes); in
        # memory it cannot fail with SQLite's "database is locked", which a 2-core machine
        # running 20 SuperNodes and their apps provoked (writes waited past 5 s).
        fed.start_superlink(database=None if case == "superlink-restart" or not in_memory
                            else ":flwr-in-memory:")
        fed.start_supernodes(nodes)
        fed.submit(overrides, run_dir)
        what = disturb(case, fed, nodes, run_dir, overrides, timeout=round_timeout * 3)
        last = "resubmit" if case == "superlink-restart" else "submit"
        code = fed.wait(last, timeout=round_timeout * (rounds + 2))
    finally:
        fed.stop_all()
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() \
        else []
    done = [r for r in rows if r["round"] >= 1]
    lost = rounds - len(done) + sum(r.get("attempts", 1) - 1 for r in done)
    statuses = {}
    for r in done:
        for name, c in r["clients"].items():
            if c["status"] != "ok":
                statuses.setdefault(name, []).append(f"r{r['round']}: {c['status'][:40]}")
    return {"case": case, "exit": code, "what": what, "completed": len(done), "lost": lost,
            "accepted": [r["accepted"] for r in done], "not-ok": statuses,
            "eval-loss": [r["eval-loss"] for r in rows], "wall": time.monotonic() - start,
            "adapter": run_dir / "adapter" / "adapter_model.safetensors"}


def max_product_difference(a: Path, b: Path) -> float:
    """Largest |ΔW| over modules between two adapters' B @ A, relative to the largest entry."""
    fa, fb = split_factors(load_file(str(a))), split_factors(load_file(str(b)))
    worst = 0.0
    for m, (a_a, b_a) in fa.items():
        wa, wb = b_a.double() @ a_a.double(), fb[m][1].double() @ fb[m][0].double()
        worst = max(worst, float((wa - wb).abs().max() / wa.abs().max()))
    return worst


def report(results: list[dict], nodes: int, rounds: int, out: Path,
           earlier: Path | None = None) -> str:
    reference = next((r for r in results if r["case"] == "undisturbed"), None)
    if reference is None and earlier is not None:  # an undisturbed run of an earlier call
        reference = {"adapter": earlier / "undisturbed" / "run" / "adapter" /
                     "adapter_model.safetensors"}
    lines = [(f"{nodes} SuperNodes (TLS + node auth, 127.0.0.1), {rounds} rounds, FLoRA, tiny "
             "model"), "", ("| case | what happened | rounds completed | rounds lost | accepted "
             "per round | disturbed nodes | final adapter vs undisturbed | wall s |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        same = "—"
        if reference and r["case"] == "superlink-restart" and r["adapter"].exists():
            diff = max_product_difference(r["adapter"], reference["adapter"])
            same = f"max rel. diff of B@A {diff:.1e}"
        nodes_txt = "; ".join(f"{n} {', '.join(s)}" for n, s in sorted(r["not-ok"].items()))
        lines.append(f"| {r['case']} | {r['what']} | {r['completed']}/{rounds} | {r['lost']} | "
                     f"{r['accepted']} | {nodes_txt or 'all ok'} | {same} | {r['wall']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "faults.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-timeout", type=float, default=240.0)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--reference", type=Path, default=None,
                        help="an earlier output folder whose undisturbed run (same nodes, "
                             "rounds and seed) the restarted run is compared with")
    parser.add_argument("--file-state", action="store_true",
                        help="every SuperLink keeps its state in a file, not only the one "
                             "that is restarted")
    parser.add_argument("--overrides", default="",
                        help="more config overrides for every case's run, e.g. "
                             "'train.num_threads=1' (one torch thread per app process)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-faults"))
    args = parser.parse_args()
    if args.nodes < 4:
        sys.exit(f"--nodes {args.nodes}: allowed: at least 4 (cases disturb nodes 0 to 3)")
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    from tests.tiny import build_tiny_model
    model = build_tiny_model(out / "tiny-model")
    results = []
    for case in args.cases:
        print(f"[bench] {case}: {args.nodes} SuperNodes, {args.rounds} rounds ...", flush=True)
        results.append(run_case(case, out, model, args.nodes, args.rounds, args.round_timeout,
                                not args.file_state, args.overrides))
        r = results[-1]
        print(f"[bench]   exit {r['exit']}, {r['completed']}/{args.rounds} rounds, lost "
              f"{r['lost']}, accepted {r['accepted']}, {r['wall']:.0f} s", flush=True)
    print()
    print(report(results, args.nodes, args.rounds, out, args.reference))
    print(f"logs and runs: {out}")


if __name__ == "__main__":
    main()
