"""The Flower ServerApp: compose the config, run the strategy, evaluate, write the run dir."""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fedapp.config import (
    build_strategy,
    compose_config,
    data_spec,
    load_run_config,
    run_setup,
    strategy_class,
)
from fedapp.llm.adapters import lora_state, target_module_shapes, with_lora
from fedapp.llm.data import partition_sizes
from fedapp.llm.model import cached_base, cached_tokenizer, default_device, resolve_model_path
from fedapp.pruning.structure import check_prunable
from fedapp.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedapp.server.deployed import DeployedEvaluator, export_deployments
from fedapp.server.emulator import prepare_emulator
from fedapp.server.evaluate import (
    evaluate_adapter,
    export_adapter,
    generation_report,
    heldout_choice_items,
    heldout_examples,
    heldout_ranking_items,
)
from fedapp.server.loop import run_rounds
from fedapp.server.ranking import RankingSet
from fedapp.server.report import RunRecorder, plot_eval_loss
from strategies.base import LoraStrategy
from strategies.shed_math import check_clusters_fit

app = ServerApp()


def make_run_dir(cfg: DictConfig, requested: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = strategy_class(cfg).name
    run_dir = Path(requested or Path.cwd() / "runs" / f"{stamp}-{name}")
    run_dir = run_dir.expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"run-dir={str(run_dir)!r} already holds a run; choose another")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run_dir


def check_federation_fits_data(cfg: DictConfig) -> None:
    """Partition the data as the clients will, before training: a split it cannot give
    (more clients than examples or label groups, an empty partition, fewer examples than
    SHED's clusters) stops the run here."""
    setup = run_setup(cfg)
    sizes = partition_sizes(setup, cfg.scenario.num_clients)
    log(INFO, "Partitions (%s): %s training examples per client", cfg.partitioner.name, sizes)
    if setup.selection.method == "shed":  # every client clusters its own examples
        check_clusters_fit(setup.selection.clusters, dict(enumerate(sizes)))


def initial_arrays(strategy: LoraStrategy, base: torch.nn.Module, targets: list[str],
                   seed: int) -> ArrayRecord:
    """Round 1's global arrays: empty, or one seeded fresh adapter that every client starts
    from (FedIT, FFA)."""
    if (initial := strategy.initial_adapter()) is None:
        return ArrayRecord()
    r, lora_alpha = initial
    with with_lora(base, r, lora_alpha, targets, seed) as model:
        return ArrayRecord(lora_state(model))


def resume(strategy: LoraStrategy, recorder: RunRecorder, ckpt: Checkpoint) -> ArrayRecord:
    """Put the strategy, the recorder and torch's RNG back as the checkpoint left them."""
    arrays = ArrayRecord(ckpt.arrays)
    strategy.load_state(ckpt.strategy_state, arrays)
    recorder.load_state(ckpt.recorder_state, ckpt.server_round)
    if ckpt.torch_rng is not None:
        torch.set_rng_state(ckpt.torch_rng)
    return arrays


def evaluation_sets(cfg: DictConfig, tokenizer) -> tuple[list[dict], list, RankingSet | None]:
    """The held-out examples of the loss, label-accuracy items and answer-ranking set (the
    last two empty / None when off): built before round 0, so a bad value fails first."""
    spec, max_length = data_spec(cfg), cfg.train.max_length
    examples = heldout_examples(spec, tokenizer, max_length, cfg.eval.max_examples)
    ranking = None
    if cfg.eval.ranking_examples:
        ranking = heldout_ranking_items(spec, tokenizer, max_length, cfg.eval.ranking_examples,
                                        cfg.eval.ranking_k, cfg.eval.ranking_score)
    choice_items = []
    if cfg.eval.accuracy_examples:
        choice_items = heldout_choice_items(spec, tokenizer, max_length,
                                            cfg.eval.accuracy_examples)
    return examples, choice_items, ranking


def report_generations(cfg: DictConfig, base: torch.nn.Module, tokenizer,
                       adapter: tuple[dict, int, float], run_dir: Path) -> None:
    """Greedy answers of the base and the final model with ROUGE-L, in generations.json."""
    log(INFO, "Answering %d held-out prompts greedily (base, then final adapter)",
        cfg.eval.generate_examples)
    rouge = generation_report(base, *adapter, data_spec(cfg), tokenizer,
                              cfg.eval.generate_examples, cfg.eval.generate_tokens,
                              run_dir / "generations.json")
    log(INFO, "ROUGE-L of the greedy answers: base %.4f -> final %.4f (generations.json)",
        rouge["rouge-l-base"], rouge["rouge-l-final"])


def export_results(cfg: DictConfig, strategy: LoraStrategy, adapter: tuple, run_dir: Path,
                   evaluate_model) -> None:
    """The global adapter, the strategy's metadata, every FedSpine device's deployed model
    and the generations, into the run directory."""
    base = cached_base(cfg.model.path, cfg.model.quantization, default_device())
    tokenizer = cached_tokenizer(cfg.model.path)
    state, r, alpha = adapter
    export_adapter(base, state, r, alpha, run_dir / "adapter",
                   resolve_model_path(cfg.model.path))
    (run_dir / "aggregate.json").write_text(json.dumps(strategy.export_metadata(), indent=2))
    if deployments := strategy.deployments():  # FedSpine: each device's pruned model
        export_deployments(deployments, resolve_model_path(cfg.model.path),
                           cfg.model.quantization, adapter, run_dir / "devices", tokenizer,
                           evaluate_model)
    if cfg.eval.generate_examples:
        report_generations(cfg, base, tokenizer, adapter, run_dir)


def run(grid: Grid, cfg: DictConfig, run_dir: Path, ckpt: Checkpoint | None = None) -> dict:
    """Everything after the config (from a checkpoint when resuming): the last metrics row."""
    check_federation_fits_data(cfg)
    device = default_device()
    base = cached_base(cfg.model.path, cfg.model.quantization, device)
    tokenizer = cached_tokenizer(cfg.model.path)
    targets = list(cfg.lora.target_modules)
    examples, choice_items, ranking_items = evaluation_sets(cfg, tokenizer)
    strategy = build_strategy(cfg, target_module_shapes(base, targets))
    if strategy.emulates and not (ckpt and ckpt.strategy_state.get("emulator")):
        # FedBiOT: its emulator's layers and alignment, before round 1 (a resumed run has it)
        prepare_emulator(strategy, base, tokenizer, int(cfg.train.max_length),
                         int(cfg.train.batch_size), targets)
    if strategy.prunes:  # a family the pruning does not know fails here, not mid-round
        check_prunable(base)
    recorder = RunRecorder(run_dir, strategy.name)

    def evaluate_model(model: torch.nn.Module, state, r: int, alpha: float) -> dict:
        return evaluate_adapter(model, state, r, alpha, examples, cfg.eval.batch_size,
                                tokenizer.pad_token_id, choice_items, ranking_items)

    every = int(cfg.eval.deployed_every) if strategy.prunes else 0
    deployed = DeployedEvaluator(resolve_model_path(cfg.model.path), cfg.model.quantization,
                                 evaluate_model) if every else None

    def evaluate(server_round: int, arrays: ArrayRecord) -> None:
        state, r, alpha = strategy.global_adapter(arrays)
        metrics = evaluate_model(base, state, r, alpha)
        if deployed is not None and server_round and server_round % every == 0:
            metrics |= deployed(strategy.deployments(), (state, r, alpha))
        row = recorder.record(server_round, metrics, strategy.round_log.get(server_round))
        ranked = (f", answer ranking {row['eval-rank-accuracy']:.3f} (MRR "
                  f"{row['eval-rank-mrr']:.3f})" if "eval-rank-accuracy" in row else "")
        log(INFO, "Round %d: held-out loss %.4f (ppl %.2f)%s, %.2f MB on the wire so far",
            server_round, row["eval-loss"], row["eval-ppl"], ranked, row["cum-mb"])

    def after_round(server_round: int, arrays: ArrayRecord) -> None:
        evaluate(server_round, arrays)
        save_checkpoint(run_dir, Checkpoint(
            server_round, arrays.to_torch_state_dict(), strategy.state_dict(),
            recorder.state_dict(), torch.get_rng_state()))

    num_rounds = strategy.num_rounds(int(cfg.num_rounds))
    if ckpt is None:
        arrays, first_round = initial_arrays(strategy, base, targets, int(cfg.seed)), 1
        evaluate(0, arrays)
    else:
        arrays, first_round = resume(strategy, recorder, ckpt), ckpt.server_round + 1
        log(INFO, "Resuming %s after round %d of %d", run_dir, ckpt.server_round, num_rounds)
    log(INFO, "Starting %s: rounds %d..%d", strategy.name, first_round, num_rounds)
    strategy.summary()
    arrays = run_rounds(strategy, grid, arrays, first_round, num_rounds,
                        float(cfg.round_timeout), int(cfg.scenario.min_replies),
                        int(cfg.scenario.round_retries), after_round)
    export_results(cfg, strategy, strategy.global_adapter(arrays), run_dir, evaluate_model)
    plot_eval_loss(recorder.rows, run_dir / "eval_loss.png", strategy.name)
    first, last = recorder.rows[0], recorder.rows[-1]
    log(INFO, "Held-out loss %.4f -> %.4f over %d rounds; %.2f MB exchanged; results in %s",
        first["eval-loss"], last["eval-loss"], last["round"], last["cum-mb"], run_dir)
    return last


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`: the run config carries Hydra overrides and the run dir;
    `resume=<run dir>` (an override) continues that run from its checkpoint."""
    cfg = compose_config(str(context.run_config.get("overrides", "")))
    ckpt = None
    if cfg.resume:
        run_dir = Path(cfg.resume).expanduser().resolve()
        ckpt = load_checkpoint(run_dir)
        cfg = load_run_config(run_dir)  # the run's own config, unchanged
    else:
        run_dir = make_run_dir(cfg, str(context.run_config.get("run-dir", "")))
    log(INFO, "Run directory: %s", run_dir)
    run(grid, cfg, run_dir, ckpt)
