"""What the server tells a client to do in one round, as a typed record.

The ServerApp is the only place that reads the Hydra config; everything a client needs
(model, data, LoRA hyperparameters, how to use the global state) travels in the message's
ConfigRecord under kebab-case keys, built and parsed here so both sides agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from flwr.app import ConfigRecord

from fedapp.llm.data import DataSpec

GLOBAL_MODES = ("none", "frozen", "init")
WIRE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class TrainInstructions:
    """One client's orders for one round."""

    model_path: str
    quantization: str
    target_modules: tuple[str, ...]
    lora_r: int
    lora_alpha: float
    local_steps: int
    lr: float
    batch_size: int
    max_length: int
    seed: int
    partitioner: str
    partitioner_alpha: float
    wire_dtype: str = "float16"
    # How the arrays in the message are used: "none" (ignored), "frozen" (a fixed low-rank
    # term beside the base, FLoRA), "init" (the trainable LoRA starts from them, FedIT).
    global_mode: str = "none"
    global_scaling: float = 1.0
    # False: lora_A stays at its initial value and only lora_B is trained and sent (FFA-LoRA).
    train_lora_a: bool = True
    num_threads: int = 0
    # FedSpine: prune the local copy structurally to `prune_ratio` of its attention / MLP
    # parameters in `prune_slices` slices, tuning LoRA `tune_steps` steps after each slice
    # (within the `local_steps` budget), scoring units by `prune_criterion`; and measure the
    # loss on a probe batch before and after, for the server's bandit. See fedapp.client.spine.
    spine_round: bool = False
    prune_ratio: float = 0.0
    prune_criterion: str = "taylor"
    prune_slices: int = 1
    tune_steps: int = 20
    data: DataSpec = field(default_factory=DataSpec)

    def to_config(self) -> ConfigRecord:
        record: dict = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "data":
                for g in dataclasses.fields(DataSpec):
                    record["data-" + g.name.replace("_", "-")] = getattr(value, g.name)
            elif isinstance(value, tuple):  # lists would break ConfigRecord.count_bytes
                record[f.name.replace("_", "-")] = ",".join(value)
            else:
                record[f.name.replace("_", "-")] = value
        return ConfigRecord(record)

    @classmethod
    def from_config(cls, config: ConfigRecord) -> TrainInstructions:
        """Parse a ConfigRecord, naming any key that is missing."""
        def get(key: str):
            if key not in config:
                raise KeyError(f"train config lacks '{key}'")
            return config[key]

        data = DataSpec(**{g.name: get("data-" + g.name.replace("_", "-"))
                           for g in dataclasses.fields(DataSpec)})
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name == "data":
                continue
            value = get(f.name.replace("_", "-"))
            kwargs[f.name] = tuple(value.split(",")) if f.name == "target_modules" else value
        return cls(data=data, **kwargs)
