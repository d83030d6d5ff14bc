"""Bad input is refused before any training, with the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from fedapp.config import build_strategy, compose_config
from fedapp.llm.model import resolve_model_path
from fedapp.server_app import check_federation_fits_data


def test_default_config_composes_to_the_documented_run():
    cfg = compose_config("")

    assert cfg.strategy.name == "flora"
    assert len(set(cfg.strategy.ranks)) > 1  # heterogeneous ranks by default
    assert cfg.model.quantization == "nf4"
    assert cfg.scenario.num_clients >= 4 and cfg.num_rounds >= 3


@pytest.mark.parametrize(("override", "expected"), [
    ("strategy=nope", "allowed: ['fedit', 'fedspine', 'ffa', 'flexlora', 'flora', 'oneshot', 'zeropad']"),
    ("model=nope", "is not a known model"),
    ("dataset=nope", "is not a known dataset"),
    ("strategy.name=nope", "strategy.name='nope'"),
    ("strategy.ranks=[8,0]", "strategy.ranks=[8, 0]; allowed: a non-empty list of positive"),
    ("train.lr=0", "train.lr=0; allowed: a number > 0"),
    ("train.lr=-1e-3", "train.lr=-0.001"),
    ("train.local_steps=0", "train.local_steps=0"),
    ("model.quantization=int3", "model.quantization='int3'; allowed: ['nf4', 'none']"),
    ("partitioner.name=random", "partitioner.name='random'"),
    ("train.wire_dtype=bfloat16", "train.wire_dtype='bfloat16'; allowed: ['float16', 'float32']"),
    ("model=hf", "without a value: ['model.path']"),
    ("no_such_key=1", "bad config override"),
])
def test_bad_config_is_refused_with_key_value_and_allowed(override, expected):
    with pytest.raises(ValueError, match=None) as err:
        compose_config(override)

    assert expected in str(err.value)


def test_fedit_refuses_heterogeneous_ranks():
    cfg = compose_config("strategy=fedit strategy.ranks=[4,8]")
    with pytest.raises(ValueError, match="fedit averages factors of one rank"):
        build_strategy(cfg, {"m": (4, 4)})


def test_more_clients_than_examples_is_refused():
    cfg = compose_config("scenario.num_clients=100000")
    with pytest.raises(ValueError, match=r"scenario.num_clients=100000 .* at most 452"):
        check_federation_fits_data(cfg)


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
