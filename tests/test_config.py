"""Bad input is refused before any training, with the key, the value and what is allowed."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedapp.config import (
    build_strategy,
    compose_config,
    load_run_config,
    run_setup,
    strategy_class,
)
from fedapp.llm.model import resolve_model_path
from fedapp.server_app import check_federation_fits_data
from strategies import FedIT, FLoRA, OneShot
from strategies.base import ClientIdentity
from strategies.protocol import DataSpec, RunSetup

STRATEGY_CONF = Path(__file__).resolve().parents[1] / "conf" / "strategy"
STRATEGY_NAMES = sorted(p.stem for p in STRATEGY_CONF.glob("*.yaml"))
# Overrides a strategy needs beyond its own name.
NEEDS = {"fedspine": "scenario=phones_laptops_edge"}


def test_default_config_composes_to_the_documented_run():
    cfg = compose_config("")

    assert strategy_class(cfg) is FLoRA and strategy_class(cfg).name == "flora"
    assert len(set(cfg.strategy.ranks)) > 1  # heterogeneous ranks by default
    assert cfg.model.quantization == "nf4"
    assert cfg.scenario.num_clients >= 4 and cfg.num_rounds >= 3


@pytest.mark.parametrize(("override", "expected"), [
    ("strategy=nope", ("allowed: ['centralized', 'fedbiot', 'fedit', 'fedkseed', 'fedpipe', "
                       "'fedspine', 'ffa', 'flexlora', 'flora', 'oneshot', 'zeropad']")),
    ("strategy=fedbiot strategy.emulator_layers=0", "an emulator must keep a layer (with zero"),
    ("strategy=fedbiot strategy.adapter_layers=0", "strategy.adapter_layers=0; allowed: "),
    ("eval.ranking_examples=-1", "eval.ranking_examples=-1; allowed: an integer >= 0"),
    ("eval.ranking_k=0", "eval.ranking_k=0; allowed: an integer >= 1"),
    ("eval.generate_examples=2.5", "eval.generate_examples=2.5; allowed: a number (int)"),
    ("eval.generate_tokens=0", "eval.generate_tokens=0; allowed: an integer >= 1"),
    ("model=nope", "is not a known model"),
    ("dataset=nope", "is not a known dataset"),
    ("strategy=nope", "strategy='nope' is not a known strategy"),
    ("strategy.ranks=[8,0]", "strategy.ranks=0; allowed: a positive integer"),
    ("strategy.ranks=[]", "strategy.ranks=[]; allowed: a non-empty list of positive integers"),
    ("train.lr=0", "train.lr=0.0; allowed: a number > 0"),
    ("train.lr=-1e-3", "train.lr=-0.001"),
    ("train.local_steps=0", "train.local_steps=0"),
    ("model.quantization=int3", "model.quantization='int3'; allowed: ['nf4', 'nf4-embeddings', 'none']"),
    ("partitioner.name=random", "partitioner.name='random'"),
    ("partitioner=dirichlet partitioner.alpha=0", "partitioner.alpha=0.0; allowed: > 0"),
    ("dataset.label_column=''", "dataset.label_column=''; allowed: a column name"),
    ("dataset.test_fraction=1", "dataset.test_fraction=1.0; allowed: 0 < x < 1"),
    ("train.wire_dtype=bfloat16", "train.wire_dtype='bfloat16'; allowed: ['float16', 'float32']"),
    ("model=hf", "without a value: ['model.path']"),
    ("no_such_key=1", "bad config override"),
])
def test_bad_config_is_refused_with_key_value_and_allowed(override, expected):
    with pytest.raises(ValueError, match=None) as err:
        compose_config(override)

    assert expected in str(err.value)


def test_fedit_refuses_heterogeneous_ranks():
    with pytest.raises(ValueError, match="fedit averages factors of one rank"):
        compose_config("strategy=fedit strategy.ranks=[4,8]")


def test_strategy_conf_files_are_the_known_strategies():
    assert STRATEGY_NAMES == ["centralized", "fedbiot", "fedit", "fedkseed", "fedpipe",
                              "fedspine", "ffa", "flexlora", "flora", "oneshot", "zeropad"]


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_conf_builds_the_class_its_target_names(name):
    # Prepare
    module, _, attr = OmegaConf.load(STRATEGY_CONF / f"{name}.yaml")._target_.rpartition(".")
    expected = getattr(importlib.import_module(module), attr)
    cfg = compose_config(f"strategy={name} {NEEDS.get(name, '')}")

    # Execute
    strategy = build_strategy(cfg, {})

    # Assert
    assert type(strategy) is expected
    assert strategy_class(cfg) is expected and strategy.name == name
    assert strategy.setup == run_setup(cfg)


def test_oneshot_trains_the_whole_budget_in_one_round():
    # Prepare
    cfg = compose_config("strategy=oneshot num_rounds=3")

    # Execute
    strategy = build_strategy(cfg, {})
    orders = [strategy.order_for(1, ClientIdentity(f"partition-{i}", i)) for i in range(4)]

    # Assert: 3 rounds x 12 local steps, ranks [4, 8, 16, 8] cycled
    assert isinstance(strategy, OneShot)
    assert cfg.train.local_steps == 12
    assert [o.local_steps for o in orders] == [36] * 4
    assert [o.lora_r for o in orders] == [4, 8, 16, 8]
    assert strategy.num_rounds(3) == 1


def test_dp_is_refused_for_a_strategy_without_it():
    with pytest.raises(ValueError, match=r"dp.enabled=True; allowed: only with strategy=flora"):
        compose_config("strategy=fedit dp.enabled=true")


def test_dp_is_accepted_for_flora():
    assert isinstance(build_strategy(compose_config("dp.enabled=true"), {}), FLoRA)


def test_unknown_strategy_key_is_refused_naming_the_strategy():
    with pytest.raises(ValueError, match=r"strategy flora \(strategies.FLoRA\): .*'foo'"):
        compose_config("+strategy.foo=1")


def test_run_setup_carries_the_configured_values():
    # Prepare
    cfg = compose_config("strategy=fedit train.lr=5e-4 train.batch_size=2 partitioner=dirichlet "
                         "partitioner.alpha=0.3 train.wire_dtype=float32 seed=4 "
                         "model.quantization=none")

    # Execute
    setup = run_setup(cfg)

    # Assert
    assert setup == RunSetup(
        model_path="smollm2-135m-instruct", quantization="none",
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), lr=5e-4, batch_size=2,
        max_length=128, partitioner="dirichlet", partitioner_alpha=0.3, wire_dtype="float32",
        num_threads=0, data=DataSpec(path="zaragoza-faq", instruction_column="q",
                                     input_column="", response_column="a",
                                     label_column="category", test_fraction=0.1, seed=4))
    assert isinstance(build_strategy(cfg, {}), FedIT)


def test_more_clients_than_examples_is_refused():
    cfg = compose_config("scenario.num_clients=100000")
    with pytest.raises(ValueError, match=r"scenario.num_clients=100000 .* at most 452"):
        check_federation_fits_data(cfg)


def test_a_split_the_clients_would_fail_on_fails_on_the_server_first():
    # natural label groups: 9 clients cannot each get a group of the FAQ's categories
    with pytest.raises(ValueError, match="partitioner.name='natural' cannot split .* into 9"):
        check_federation_fits_data(compose_config("scenario.num_clients=9"))
    check_federation_fits_data(compose_config("scenario.num_clients=9 partitioner=iid"))


@pytest.mark.parametrize("overrides, sampled", [
    ("scenario=partial scenario.min_replies=3", 2),
    ("strategy=centralized scenario.min_replies=2", 1)])
def test_more_replies_required_than_a_round_samples_is_refused(overrides, sampled):
    with pytest.raises(ValueError, match=rf"scenario.min_replies=\d; allowed: at most the "
                                         rf"{sampled} clients a round"):
        compose_config(overrides)


def test_missing_column_is_named():
    cfg = compose_config("dataset.response_column=answer")
    with pytest.raises(ValueError, match=r"dataset.response_column='answer' is not a column"):
        check_federation_fits_data(cfg)


def test_unreadable_model_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing-model"))
    with pytest.raises(ValueError, match="without config.json"):
        resolve_model_path(str(tmp_path))


def test_hub_ids_and_model_folders_pass_through(tiny_model_dir):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr='abc'; allowed: a number (float)"),
    ("seed=1.5", "seed=1.5; allowed: a number (int)"),
    ("lora.alpha_ratio=abc", "lora.alpha_ratio='abc'; allowed: a number (float)"),
    ("scenario.round_retries=abc", "scenario.round_retries='abc'; allowed: a number (int)"),
    ("model.path=''", "model.path=''; allowed: a Hugging Face model folder"),
])
def test_values_of_the_wrong_type_are_refused_by_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compose_config(override)


@pytest.mark.parametrize("strategy, extra", [
    ("flora", ""), ("oneshot", "num_rounds=3"), ("fedspine", "scenario=phones_laptops_edge")])
def test_a_run_config_written_before_target_reads_as_today(tmp_path, strategy, extra):
    # Prepare: today's composed config, written back in the old form (strategy.name; FedSpine
    # with its unused ranks; one-shot without budget_rounds)
    cfg = compose_config(f"strategy={strategy} {extra}")
    old = OmegaConf.to_container(cfg)
    old["strategy"].pop("_target_")
    old["strategy"] = {"name": strategy, **old["strategy"]}
    if strategy == "fedspine":
        old["strategy"]["ranks"] = [8]
    old["strategy"].pop("budget_rounds", None)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))

    # Execute
    loaded = load_run_config(tmp_path)

    # Assert: the same strategy as today's config builds, with the same orders
    now, then = build_strategy(cfg, {}), build_strategy(loaded, {})
    client = ClientIdentity("partition-2", 2)
    assert type(then) is type(now)
    assert then.order_for(1, client) == now.order_for(1, client)


def test_a_run_written_before_ranking_and_generations_resumes_without_them(tmp_path):
    old = OmegaConf.to_container(compose_config(""))
    for key in ("ranking_examples", "ranking_k", "ranking_score", "generate_examples",
                "generate_tokens"):
        old["eval"].pop(key)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))

    loaded = load_run_config(tmp_path)

    assert loaded.eval.ranking_examples == 0 and loaded.eval.generate_examples == 0
    assert loaded.eval.ranking_k == 3 and loaded.eval.ranking_score == "pmi"


SMOLLM2_SHAPES = {"m.q_proj": (576, 576), "m.k_proj": (192, 576)}  # k_proj: 3 kv heads × 64


@pytest.mark.parametrize("overrides, message", [
    ("strategy.ranks=[8,600] strategy.rank_budget=600",
     (r"strategy.ranks=\[8, 600\]: rank 600 exceeds 576, the largest rank any target module "
     r"has; allowed: ranks <= 576")),
    ("strategy=fedspine strategy.bandit.ranks=[4,1000] strategy.bandit.max_rank=1000",
     r"strategy.bandit.ranks=\[4, 1000\]: rank 1000 exceeds 576")])
def test_ranks_wider_than_the_model_are_refused_where_the_run_is_built(overrides, message):
    cfg = compose_config(overrides)  # the model's shapes are known once it is loaded
    with pytest.raises(ValueError, match=message):
        build_strategy(cfg, SMOLLM2_SHAPES)
    build_strategy(compose_config(""), SMOLLM2_SHAPES)  # the default fits
    build_strategy(compose_config("strategy.ranks=[256] strategy.rank_budget=256"),
                   SMOLLM2_SHAPES)  # wider than k_proj only: still of use to q_proj


def test_a_rank_budget_below_a_client_rank_is_refused_when_composed():
    with pytest.raises(ValueError, match=r"strategy.rank_budget=6 is below the largest client "
                                         r"rank 8.*allowed: >= 8"):
        compose_config("strategy.ranks=[4,8] strategy.rank_budget=6")
