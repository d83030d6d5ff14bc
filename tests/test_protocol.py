"""The message contract (strategies/protocol.py): what travels under which keys, exact
round trips, and values refused where they are created, naming key, value and what is
allowed."""

from __future__ import annotations

import re

import pytest

from strategies.protocol import (
    DataSpec,
    PruneOrder,
    RunSetup,
    TrainOrder,
    alpha_for,
)


def make_setup(**fields) -> RunSetup:
    values = {"model_path": "models/tiny", "quantization": "nf4",
              "target_modules": ("q_proj", "v_proj"), "lr": 1e-3, "batch_size": 4,
              "max_length": 128, "partitioner": "dirichlet", "partitioner_alpha": 0.5}
    return RunSetup(**(values | fields))


def make_order(**fields) -> TrainOrder:
    values = {"server_round": 3, "lora_r": 8, "lora_alpha": 16.0, "local_steps": 12, "seed": 3}
    return TrainOrder(**(values | fields))


# ---------------------------------------------------------------------------------------
# Round trips and the wire format


@pytest.mark.parametrize("value", [
    make_setup(),
    make_setup(quantization="none", target_modules=("q_proj",), partitioner="iid",
               partitioner_alpha=0.0, wire_dtype="float32", num_threads=2,
               data=DataSpec(path="data/alpaca.jsonl", instruction_column="instruction",
                             input_column="input", response_column="output", label_column="",
                             test_fraction=0.25, seed=7)),
    make_order(),
    make_order(global_mode="frozen", train_lora_a=False,
               prune=PruneOrder(ratio=0.25, criterion="llm-drop", slices=3, tune_steps=5)),
    make_order(prune=PruneOrder(ratio=0.0)),
], ids=["setup", "setup-iid-local-file", "order", "order-pruned", "order-prune-ratio-0"])
def test_to_config_and_from_dict_round_trip_exactly(value):
    # Execute
    back = type(value).from_dict(value.to_config())

    # Assert
    assert back == value
    assert type(back.to_config()) is type(value.to_config())
    assert dict(back.to_config().items()) == dict(value.to_config().items())


def test_train_order_wire_format():
    # Prepare
    order = make_order(global_mode="frozen",
                       prune=PruneOrder(ratio=0.5, criterion="magnitude", slices=2, tune_steps=4,
                                        reached=0.25, target=0.75))

    # Execute
    record = dict(order.to_config().items())

    # Assert: kebab-case keys, the prune order flattened under "prune-"
    assert record == {"server-round": 3, "lora-r": 8, "lora-alpha": 16.0, "local-steps": 12,
                      "seed": 3, "global-mode": "frozen", "train-lora-a": True,
                      "pooled": False,
                      "prune-ratio": 0.5, "prune-criterion": "magnitude", "prune-slices": 2,
                      "prune-tune-steps": 4, "prune-reached": 0.25, "prune-calibration": 8,
                          "prune-target": 0.75, "prune-allocation": "uniform"}


def test_order_without_prune_sends_no_prune_keys():
    # Execute
    record = make_order().to_config()

    # Assert
    assert not [k for k in record if k.startswith("prune")]
    assert TrainOrder.from_dict(record).prune is None


def test_run_setup_wire_format():
    # Execute
    record = make_setup().to_config()

    # Assert: tuples comma-joined, the DataSpec flattened under "data-"
    assert record["target-modules"] == "q_proj,v_proj"
    assert record["model-path"] == "models/tiny"
    assert record["partitioner-alpha"] == 0.5
    assert (record["data-path"], record["data-label-column"], record["data-seed"]) == (
        "zaragoza-faq", "category", 0)


RUN_WIDE = ("lr", "model-path", "batch-size", "data-path", "max-length", "quantization",
            "target-modules", "wire-dtype", "partitioner")


def test_run_wide_keys_travel_in_the_setup_not_in_the_train_order():
    # Execute
    order_keys = set(make_order(prune=PruneOrder(ratio=0.5)).to_config().keys())
    setup_keys = set(make_setup().to_config().keys())

    # Assert
    assert order_keys.isdisjoint(RUN_WIDE)
    assert setup_keys.issuperset(RUN_WIDE)


@pytest.mark.parametrize(("value", "missing"), [
    (make_setup(), "lr"),
    (make_setup(), "target-modules"),
    (make_setup(), "data-path"),
    (make_order(), "lora-r"),
    (make_order(), "global-mode"),
    (make_order(prune=PruneOrder(ratio=0.5)), "prune-slices"),
])
def test_missing_key_is_named(value, missing):
    # Prepare
    record = value.to_dict()
    del record[missing]

    # Execute / Assert
    with pytest.raises(KeyError, match=f"message config lacks '{missing}'"):
        type(value).from_dict(record)


# ---------------------------------------------------------------------------------------
# Hand-computed values


@pytest.mark.parametrize(("r", "ratio", "expected"),
                         [(8, 2.0, 16.0), (4, 0.5, 2.0), (16, 1.0, 16.0)])
def test_alpha_for_is_ratio_times_rank(r, ratio, expected):
    assert alpha_for(r, ratio) == expected


@pytest.mark.parametrize(("r", "alpha", "expected"),
                         [(8, 16.0, 2.0), (4, 2.0, 0.5), (16, 4.0, 0.25)])
def test_scaling_is_alpha_over_rank(r, alpha, expected):
    assert make_order(lora_r=r, lora_alpha=alpha).scaling == expected


def test_every_client_gets_the_same_scaling_from_alpha_for():
    # Execute
    scalings = {make_order(lora_r=r, lora_alpha=alpha_for(r, 2.0)).scaling for r in (4, 8, 16)}

    # Assert
    assert scalings == {2.0}


# ---------------------------------------------------------------------------------------
# Validation in __post_init__


def data(**fields) -> DataSpec:
    return DataSpec(**fields)


def prune(**fields) -> PruneOrder:
    return PruneOrder(**({"ratio": 0.5} | fields))


BAD = [
    (data, {"path": ""}, "dataset.path=''; allowed: a non-empty path or name"),
    (data, {"instruction_column": ""}, "dataset.instruction_column=''; allowed: a column name"),
    (data, {"response_column": None}, "dataset.response_column=None; allowed: a column name"),
    (data, {"test_fraction": 0}, "dataset.test_fraction=0; allowed: 0 < x < 1"),
    (data, {"test_fraction": 1.0}, "dataset.test_fraction=1.0; allowed: 0 < x < 1"),
    (data, {"test_fraction": float("nan")}, "dataset.test_fraction=nan; allowed: 0 < x < 1"),
    (data, {"seed": 1.5}, "seed=1.5; allowed: an integer"),
    (make_setup, {"quantization": "int3"},
     "model.quantization='int3'; allowed: ['nf4', 'nf4-embeddings', 'none']"),
    (make_setup, {"target_modules": ()},
     "lora.target_modules=[]; allowed: a non-empty list of module names"),
    (make_setup, {"target_modules": ("q_proj,v_proj",)},
     "lora.target_modules=['q_proj,v_proj']; allowed: a non-empty list of module names"),
    (make_setup, {"target_modules": ("q_proj", "")},
     "lora.target_modules=['q_proj', '']; allowed: a non-empty list of module names"),
    (make_setup, {"lr": 0}, "train.lr=0; allowed: a number > 0"),
    (make_setup, {"lr": -1e-3}, "train.lr=-0.001; allowed: a number > 0"),
    (make_setup, {"lr": float("inf")}, "train.lr=inf; allowed: a number > 0"),
    (make_setup, {"lr": True}, "train.lr=True; allowed: a number > 0"),
    (make_setup, {"batch_size": 0}, "train.batch_size=0; allowed: a positive integer"),
    (make_setup, {"batch_size": 2.0}, "train.batch_size=2.0; allowed: a positive integer"),
    (make_setup, {"max_length": -1}, "train.max_length=-1; allowed: a positive integer"),
    (make_setup, {"partitioner": "random"},
     "partitioner.name='random'; allowed: ['iid', 'dirichlet', 'natural']"),
    (make_setup, {"partitioner_alpha": 0.0}, "partitioner.alpha=0.0; allowed: > 0"),
    (make_setup, {"wire_dtype": "bfloat16"},
     "train.wire_dtype='bfloat16'; allowed: ['float16', 'float32']"),
    (make_setup, {"num_threads": -1}, "train.num_threads=-1; allowed: an integer >= 0"),
    (make_setup, {"loss": "fused"}, "train.loss='fused'; allowed: ['chunked', 'plain']"),
    (make_setup, {"gradient_checkpointing": 1},
     "train.gradient_checkpointing=1; allowed: true or false"),
    (make_setup, {"release_memory": "yes"}, "train.release_memory='yes'; allowed: true or false"),
    (make_setup, {"fp32_compute": "on"}, "train.fp32_compute='on'; allowed: true or false"),
    (make_setup, {"pad_multiple": 0},
     ("train.pad_multiple=0; allowed: an integer from 1 (no padding beyond the batch's "
      "longest) to train.max_length (128)")),
    (make_setup, {"pad_multiple": 256}, "train.pad_multiple=256; allowed: an integer from 1"),
    (make_setup, {"partitioner": "natural", "data": DataSpec(label_column="")},
     "dataset.label_column=''; allowed: a column name (partitioner.name='natural'"),
    (prune, {"ratio": 1.0}, "scenario.devices.<class>.sparsity=1.0; allowed: 0 <= ratio < 1"),
    (prune, {"ratio": -0.25}, "scenario.devices.<class>.sparsity=-0.25; allowed: 0 <= ratio < 1"),
    (prune, {"reached": 0.75}, "reached=0.75; allowed: 0 <= reached <= ratio (0.5)"),
    (prune, {"calibration": 0}, "strategy.prune.calibration=0; allowed: an int >= 1"),
    (prune, {"criterion": "random"},
     "strategy.prune.criterion='random'; allowed: ['magnitude', 'taylor', 'fisher', 'llm-drop']"),
    (prune, {"slices": 0}, "strategy.prune.slices=0; allowed: an int >= 1"),
    (prune, {"tune_steps": 0}, "strategy.prune.tune_steps=0; allowed: an int >= 1"),
    (make_order, {"server_round": 0}, "server-round=0; allowed: an int >= 1"),
    (make_order, {"lora_r": 0}, "strategy.ranks=0; allowed: a positive integer"),
    (make_order, {"lora_r": 4.0}, "strategy.ranks=4.0; allowed: a positive integer"),
    (make_order, {"lora_alpha": 0.0}, "lora.alpha_ratio=0.0; allowed: a number > 0"),
    (make_order, {"local_steps": 0}, "train.local_steps=0; allowed: a positive integer"),
    (make_order, {"seed": "3"}, "seed='3'; allowed: an integer"),
    (make_order, {"global_mode": "x"}, "global-mode='x'; allowed: ['none', 'frozen', 'init']"),
    (make_order, {"train_lora_a": 1}, "train-lora-a=1; allowed: true or false"),
    (make_order, {"pooled": "yes"}, "pooled='yes'; allowed: true or false"),
    (make_order, {"prune": PruneOrder(ratio=0.5), "pooled": True},
     "pooled=True; allowed: false in a pruned round"),
    (make_order, {"prune": PruneOrder(ratio=0.5, slices=13)},
     "strategy.prune.slices=13; allowed: at most train.local_steps=12"),
    (make_order, {"prune": PruneOrder(ratio=0.5), "global_mode": "init"},
     "global-mode='init'; allowed: 'none' or 'frozen' in a pruned round"),
]


@pytest.mark.parametrize(("make", "fields", "expected"), BAD,
                         ids=[f"{m.__name__}-{'-'.join(f)}" for m, f, _ in BAD])
def test_bad_value_is_refused_naming_key_value_and_allowed(make, fields, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        make(**fields)


@pytest.mark.parametrize(("make", "fields"), [
    (data, {"test_fraction": 0.5, "input_column": "", "label_column": ""}),
    (make_setup, {"partitioner": "iid", "partitioner_alpha": 0.0,
                  "data": DataSpec(label_column="")}),
    (make_setup, {"partitioner": "natural", "partitioner_alpha": 0.0}),
    (prune, {"ratio": 0.0, "slices": 1, "tune_steps": 1}),
    (make_order, {"prune": PruneOrder(ratio=0.5, slices=12), "global_mode": "frozen"}),
    (make_order, {"lora_alpha": 3}),
], ids=["data", "setup-iid", "setup-natural", "prune", "order-pruned",
        "order-int-alpha"])
def test_values_at_the_limits_are_accepted(make, fields):
    # Execute
    value = make(**fields)

    # Assert
    assert value == type(value).from_dict(value.to_config())


def test_target_modules_list_is_kept_as_a_tuple():
    # Execute
    setup = make_setup(target_modules=["q_proj", "v_proj"])

    # Assert: frozen and hashable, equal to the setup built from a tuple
    assert setup.target_modules == ("q_proj", "v_proj")
    assert setup == make_setup() and hash(setup) == hash(make_setup())


def test_a_single_module_name_string_is_refused():
    with pytest.raises(ValueError, match=re.escape("lora.target_modules='q_proj'")):
        make_setup(target_modules="q_proj")
