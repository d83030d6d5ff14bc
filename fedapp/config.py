"""The Hydra config: compose it once and turn it into explicit objects.

Nothing below this module reads the config. It builds the run's `RunSetup` (sent once to
every client) and the strategy (`hydra.utils.instantiate` of `conf/strategy/<name>.yaml`'s
`_target_`); everything else receives plain arguments. Values are validated by the objects
that hold them (RunSetup, TrainOrder, the strategy, DeviceProfile, BanditConfig), so
`validate` just builds them once, before any model is loaded or client trained.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

import fedapp
from fedapp.server.ranking import SCORES
from strategies.base import LoraStrategy
from strategies.devices import DeviceProfile, device_profiles
from strategies.protocol import DataSpec, RunSetup, SelectionSpec, require

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


def number(cfg: DictConfig, key: str, kind: type[int | float]) -> Any:
    """The value at `key` as `kind` (an int is also a float), refusing other types by key:
    the values' ranges are then checked by the objects that hold them."""
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, int | float) if kind is float else isinstance(value, int)
    require(ok and not isinstance(value, bool), key, value, f"a number ({kind.__name__})")
    return kind(value)


def validate(cfg: DictConfig) -> None:
    """Check every value a run depends on, before any model is loaded or client trained:
    the server loop's own keys here, the rest by building the objects that hold them."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ValueError(f"config keys without a value: {sorted(missing)} (set them as overrides)")
    for key, value in (("num_rounds", cfg.num_rounds), ("scenario.num_clients",
                                                         cfg.scenario.num_clients),
                       ("scenario.min_replies", cfg.scenario.min_replies),
                       ("eval.batch_size", cfg.eval.batch_size)):
        require(isinstance(value, int) and value >= 1, key, value, "a positive integer")
    require(number(cfg, "scenario.round_retries", int) >= 0, "scenario.round_retries",
             cfg.scenario.round_retries, "an integer >= 0")
    require(number(cfg, "eval.ranking_examples", int) >= 0, "eval.ranking_examples",
             cfg.eval.ranking_examples, "an integer >= 0 (0 turns answer ranking off)")
    require(number(cfg, "eval.ranking_k", int) >= 1, "eval.ranking_k", cfg.eval.ranking_k,
             "an integer >= 1 (other answers each question's true answer is ranked against)")
    require(cfg.eval.ranking_score in SCORES, "eval.ranking_score", cfg.eval.ranking_score,
             str(list(SCORES)))
    require(number(cfg, "eval.generate_examples", int) >= 0, "eval.generate_examples",
             cfg.eval.generate_examples, "an integer >= 0 (0 turns generation off)")
    require(number(cfg, "eval.generate_tokens", int) >= 1, "eval.generate_tokens",
             cfg.eval.generate_tokens, "an integer >= 1")
    require(number(cfg, "eval.deployed_every", int) >= 0, "eval.deployed_every",
            cfg.eval.deployed_every, "an integer >= 0 (0: deployed models at the end only)")
    if cfg.eval.accuracy_examples:
        require(bool(cfg.dataset.label_column), "eval.accuracy_examples",
                 cfg.eval.accuracy_examples, "0 unless dataset.label_column is set")
    strategy = build_strategy(cfg, module_shapes={})
    if strategy.setup.selection.method == "shed":  # SHED embeds with the full base model
        require(not getattr(strategy, "emulates", False), "train.selection", "shed",
                f"'all' or 'random' with strategy={strategy.name} (its clients hold only "
                "the emulator, never the full model SHED embeds the examples with)")
    sampled = strategy.sample_size(cfg.scenario.num_clients)
    require(cfg.scenario.min_replies <= sampled, "scenario.min_replies",
            cfg.scenario.min_replies, f"at most the {sampled} clients a round of strategy="
            f"{strategy.name} samples from scenario.num_clients={cfg.scenario.num_clients} "
            "(fraction_train, min_train_nodes); more would fail every round")


def data_spec(cfg: DictConfig) -> DataSpec:
    d = cfg.dataset
    return DataSpec(path=str(d.path), instruction_column=d.instruction_column,
                    input_column=d.input_column, response_column=d.response_column,
                    label_column=d.label_column,
                    test_fraction=number(cfg, "dataset.test_fraction", float),
                    seed=number(cfg, "seed", int))


def selection_spec(cfg: DictConfig) -> SelectionSpec:
    """`train.selection*`: which examples each client keeps (defaults: all of them)."""
    t = cfg.train
    return SelectionSpec(method=t.get("selection", "all"),
                         budget=t.get("selection_budget", 1.0),
                         clusters=t.get("selection_clusters", 8),
                         proxy_examples=t.get("selection_proxy_examples", 8),
                         permutations=t.get("selection_permutations", 64))


def run_setup(cfg: DictConfig) -> RunSetup:
    """What every client needs for the whole run (sent once per client)."""
    return RunSetup(
        model_path=str(cfg.model.path), quantization=cfg.model.quantization,
        target_modules=cfg.lora.target_modules, lr=number(cfg, "train.lr", float),
        batch_size=cfg.train.batch_size, max_length=cfg.train.max_length,
        partitioner=cfg.partitioner.name,
        partitioner_alpha=number(cfg, "partitioner.alpha", float),
        wire_dtype=cfg.train.wire_dtype, num_threads=cfg.train.num_threads,
        loss=cfg.train.get("loss", "chunked"),
        gradient_checkpointing=cfg.train.get("gradient_checkpointing", False),
        release_memory=cfg.train.get("release_memory", False),
        fp32_compute=cfg.train.get("fp32_compute", False),
        pad_multiple=cfg.train.get("pad_multiple", 1),
        data=data_spec(cfg), selection=selection_spec(cfg))


def scenario_devices(cfg: DictConfig) -> list[DeviceProfile]:
    """The scenario's device profile per partition id (strategies.devices)."""
    sc = cfg.scenario
    devices = sc.get("devices")
    return device_profiles(OmegaConf.to_container(devices) if devices else None,
                           list(sc.get("device_of_client") or []),
                           number(cfg, "scenario.bandwidth_up_mbps", float),
                           number(cfg, "scenario.bandwidth_down_mbps", float))


def strategy_class(cfg: DictConfig) -> type[LoraStrategy]:
    """The class `conf/strategy/<name>.yaml` names in `_target_`."""
    return get_class(cfg.strategy._target_)


def build_strategy(cfg: DictConfig,
                   module_shapes: Mapping[str, tuple[int, int]]) -> LoraStrategy:
    """The configured strategy: its own keys from `strategy.*`, the run's from the rest."""
    cls = strategy_class(cfg)
    kwargs: dict[str, Any] = {
        "setup": run_setup(cfg), "module_shapes": module_shapes,
        "local_steps": cfg.train.local_steps,
        "alpha_ratio": number(cfg, "lora.alpha_ratio", float), "seed": number(cfg, "seed", int),
        "fraction_train": number(cfg, "scenario.fraction_train", float),
        "min_train_nodes": number(cfg, "scenario.min_train_nodes", int),
        "min_available_nodes": number(cfg, "scenario.num_clients", int),
        "wait_seconds": number(cfg, "scenario.wait_seconds", float),
        "devices": scenario_devices(cfg)}
    if cls.prunes:  # FedSpine: every device reaches its target sparsity by the last round
        kwargs["num_rounds"] = number(cfg, "num_rounds", int)
    if cfg.dp.enabled:
        require(cls.supports_dp, "dp.enabled", True, "only with strategy=flora (other "
                 "strategies average factors or prune, which the clipping and noise here do "
                 "not cover)")
        kwargs["dp"] = OmegaConf.to_container(cfg.dp)
    # _partial_: Hydra only binds `strategy.*`; the run's objects go in as they are.
    make = instantiate(cfg.strategy, _partial_=True, _convert_="all")
    try:
        return make(**kwargs)
    except TypeError as err:  # e.g. a key in strategy.* the class does not take
        raise ValueError(f"strategy {cls.name} ({cfg.strategy._target_}): {err}") from None


def load_run_config(run_dir: Path) -> DictConfig:
    """A run directory's own composed config (to resume it, or to train a late client with
    its orders), validated. A config written before strategies were built from `_target_`
    names its strategy by `strategy.name`: it is read as that strategy's file names it today
    (FedSpine's unused `ranks` dropped, one-shot's budget taken from `num_rounds`)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; allowed: a run directory written by "
                                "the ServerApp")
    cfg = OmegaConf.load(path)
    if "_target_" not in cfg.strategy and "name" in cfg.strategy:
        old = OmegaConf.to_container(cfg.strategy)
        name = old.pop("name")
        require(name in group_options("strategy"), "strategy.name", name,
                str(group_options("strategy")))
        target = OmegaConf.load(conf_dir() / "strategy" / f"{name}.yaml")._target_
        if get_class(target).picks_ranks:
            old.pop("ranks", None)
        if name == "oneshot":
            old.setdefault("budget_rounds", int(cfg.num_rounds))
        cfg.strategy = {"_target_": target, **old}
    for key, value in KEYS_ADDED_SINCE.items():  # an older run resumes as it started
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, value)
    validate(cfg)
    return cfg


# Keys a run directory written before they existed lacks, with the value that reproduces
# what that run did: evaluations added later stay off, so its metrics stay comparable.
KEYS_ADDED_SINCE = {"eval.ranking_examples": 0, "eval.ranking_k": 3, "eval.ranking_score": "pmi",
                    "eval.generate_examples": 0, "eval.generate_tokens": 48,
                    "eval.deployed_every": 0}
