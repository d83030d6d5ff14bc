"""The Hydra config: compose it once, check it, and turn it into explicit objects.

Nothing below this module reads the config: it builds the clients' `TrainInstructions`
template and the strategy, and everything else receives plain arguments.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

import fedapp
from fedapp.llm.data import PARTITIONERS, DataSpec
from strategies.protocol import WIRE_DTYPES, TrainInstructions
from fedapp.llm.model import QUANTIZATIONS

GROUPS = ("model", "dataset", "partitioner", "strategy", "scenario")


def conf_dir() -> Path:
    """conf/ beside the package (source tree, Flower app bundle) or inside it (wheel)."""
    package = Path(fedapp.__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError(f"no conf/config.yaml next to {package}")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def compose_config(overrides: str | list[str] = "") -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides (a list, or one space-separated string)."""
    items = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    for item in items:
        key, _, value = item.partition("=")
        if key.lstrip("+~") in GROUPS and value not in group_options(key.lstrip("+~")):
            raise ValueError(f"{key}={value!r} is not a known {key}; allowed: "
                             f"{group_options(key.lstrip('+~'))}")
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=items)
    except HydraException as err:
        raise ValueError(f"bad config override in {items}: {err}") from None
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}; allowed: {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check every value a run depends on, before any model is loaded or client trained."""
    from strategies import STRATEGIES

    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ValueError(f"config keys without a value: {sorted(missing)} (set them as overrides)")
    _require(cfg.model.quantization in QUANTIZATIONS, "model.quantization",
             cfg.model.quantization, str(list(QUANTIZATIONS)))
    _require(cfg.strategy.name in STRATEGIES, "strategy.name", cfg.strategy.name,
             str(sorted(STRATEGIES)))
    _require(cfg.partitioner.name in PARTITIONERS, "partitioner.name", cfg.partitioner.name,
             str(list(PARTITIONERS)))
    ranks = list(cfg.strategy.ranks)
    _require(bool(ranks) and all(isinstance(r, int) and r > 0 for r in ranks),
             "strategy.ranks", ranks, "a non-empty list of positive integers")
    _require(cfg.train.lr > 0, "train.lr", cfg.train.lr, "a number > 0")
    for key in ("local_steps", "batch_size", "max_length"):
        _require(cfg.train[key] > 0, f"train.{key}", cfg.train[key], "a positive integer")
    _require(cfg.train.wire_dtype in WIRE_DTYPES, "train.wire_dtype", cfg.train.wire_dtype,
             str(list(WIRE_DTYPES)))
    _require(cfg.lora.alpha_ratio > 0, "lora.alpha_ratio", cfg.lora.alpha_ratio, "a number > 0")
    _require(len(cfg.lora.target_modules) > 0, "lora.target_modules",
             list(cfg.lora.target_modules), "a non-empty list of module names")
    _require(cfg.num_rounds > 0, "num_rounds", cfg.num_rounds, "a positive integer")
    _require(cfg.scenario.num_clients >= 1, "scenario.num_clients", cfg.scenario.num_clients,
             "a positive integer")
    _require(0 < cfg.scenario.fraction_train <= 1, "scenario.fraction_train",
             cfg.scenario.fraction_train, "0 < x <= 1")
    _require(0 < cfg.dataset.test_fraction < 1, "dataset.test_fraction",
             cfg.dataset.test_fraction, "0 < x < 1")
    if cfg.eval.accuracy_examples:
        _require(bool(cfg.dataset.label_column), "eval.accuracy_examples",
                 cfg.eval.accuracy_examples, "0 unless dataset.label_column is set")
    _require(cfg.scenario.min_replies >= 1, "scenario.min_replies", cfg.scenario.min_replies,
             "a positive integer")
    _require(cfg.scenario.round_retries >= 0, "scenario.round_retries",
             cfg.scenario.round_retries, "an integer >= 0")
    if cfg.dp.enabled:
        _require(cfg.strategy.name == "flora", "dp.enabled", True,
                 "only with strategy=flora (other strategies average factors, which the "
                 "clipping and noise here do not cover)")
    scenario_devices(cfg)  # raises on an unknown device class or a bad value
    if cfg.strategy.name == "fedspine":
        from strategies.fedspine import check_fedspine_config

        check_fedspine_config({**OmegaConf.to_container(cfg.strategy),
                               "local_steps": int(cfg.train.local_steps)})
    if cfg.partitioner.name == "dirichlet":
        _require(cfg.partitioner.alpha > 0, "partitioner.alpha", cfg.partitioner.alpha, "> 0")


def scenario_devices(cfg: DictConfig) -> list:
    """The scenario's device profile per partition id (strategies.devices)."""
    from strategies.devices import device_profiles

    sc = cfg.scenario
    devices = sc.get("devices")
    return device_profiles(OmegaConf.to_container(devices) if devices else None,
                           list(sc.get("device_of_client") or []),
                           float(sc.bandwidth_up_mbps), float(sc.bandwidth_down_mbps))


def data_spec(cfg: DictConfig) -> DataSpec:
    d = cfg.dataset
    return DataSpec(path=str(d.path), instruction_column=d.instruction_column,
                    input_column=d.input_column, response_column=d.response_column,
                    label_column=d.label_column, test_fraction=float(d.test_fraction),
                    seed=int(cfg.seed))


def train_template(cfg: DictConfig) -> TrainInstructions:
    """The orders every client gets; strategies set rank, alpha and seed per client."""
    r = int(cfg.strategy.ranks[0])
    return TrainInstructions(
        model_path=str(cfg.model.path), quantization=cfg.model.quantization,
        target_modules=tuple(cfg.lora.target_modules), lora_r=r,
        lora_alpha=float(cfg.lora.alpha_ratio) * r, local_steps=int(cfg.train.local_steps),
        lr=float(cfg.train.lr), batch_size=int(cfg.train.batch_size),
        max_length=int(cfg.train.max_length), seed=int(cfg.seed),
        partitioner=cfg.partitioner.name, partitioner_alpha=float(cfg.partitioner.alpha),
        wire_dtype=cfg.train.wire_dtype, num_threads=int(cfg.train.num_threads),
        data=data_spec(cfg))


def build_strategy(cfg: DictConfig, module_shapes: Mapping[str, tuple[int, int]]):
    """The strategy named by `strategy.name`, with the config's clients and ranks."""
    from strategies import STRATEGIES

    extra = {k: v for k, v in OmegaConf.to_container(cfg.strategy).items()
             if k not in ("name", "ranks")}
    return STRATEGIES[cfg.strategy.name](
        train_template(cfg), module_shapes, ranks=list(cfg.strategy.ranks),
        alpha_ratio=float(cfg.lora.alpha_ratio), seed=int(cfg.seed),
        fraction_train=float(cfg.scenario.fraction_train),
        min_train_nodes=int(cfg.scenario.min_train_nodes),
        min_available_nodes=int(cfg.scenario.num_clients),
        wait_seconds=float(cfg.scenario.wait_seconds), devices=scenario_devices(cfg), **extra,
        **({"dp": OmegaConf.to_container(cfg.dp)} if cfg.dp.enabled else {}))
