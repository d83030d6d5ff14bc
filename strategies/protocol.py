"""The contract between the server and its clients: what is sent, under which keys.

Torch-free, so both sides (and tools) can import it without the model stack.

- `RunSetup`: what stays the same for a whole run (model, data, batch size, learning rate,
  wire dtype, ...). The server sends it **once per client**, as the "setup" record of the
  first train message it sends that client (again if the client answers NO_SETUP); the
  client keeps it in its Flower `context.state`.
- `TrainOrder`: what one client does in one round (rank, lora_alpha, steps, seed, how to use
  the global arrays, optionally a pruning order). It travels in every train message.
- `GlobalVersion` (FLoRA, in `strategies.global_version`): which version of the global
  update the arrays give. A client that cannot use them fails with NO_GLOBAL.

Each dataclass validates its values where it is created (`__post_init__`, as peft's
`LoraConfig` does), naming the config key the value came from, so a bad value stops the run
on the server before any training and a bad message is refused by the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strategies.records import Record, config_key, is_int, is_number, require

# nf4-embeddings: nf4, and the token embedding / output head in NF4 too (fedapp.llm.embedding)
QUANTIZATIONS = ("nf4", "nf4-embeddings", "none")
PARTITIONERS = ("iid", "dirichlet", "natural")
WIRE_DTYPES = ("float16", "float32")
LOSSES = ("chunked", "plain")  # fedapp.llm.loss: the same value, chunked without full logits
# How a client uses the arrays of a train message: ignore them ("none"), keep them as a
# frozen low-rank term beside the base ("frozen", FLoRA), or start its LoRA from them ("init").
GLOBAL_MODES = ("none", "frozen", "init")
# structured-pruning importance criteria (fedapp.pruning.importance)
CRITERIA = ("magnitude", "taylor", "fisher", "llm-drop")
UNIT_CRITERIA = ("fisher", "taylor", "magnitude")  # those that keep every block: a stock shape
# how a prune spreads over the layers (fedapp.pruning.allocation): the same share of every
# layer (a stock shape), or units ranked across layers (scores that estimate a loss change)
ALLOCATIONS = ("uniform", "global")
GLOBAL_CRITERIA = ("fisher", "taylor")
ZO_SAMPLINGS = ("uniform", "pro")  # FedKSeed: how a client draws its seeds (kseed_math)
DEFAULT_DATASET = "zaragoza-faq"

# Records of the messages. Query: "setup" (server → client), "identity" (client → server).
# Train: "config" + "arrays" (+ "global", FLoRA; + "units", FedSpine) (server → client);
# "arrays", "metrics", "kept" + "units" (a pruned client) (client → server).
SETUP, IDENTITY, CONFIG, ARRAYS, METRICS, KEPT, GLOBAL, UNITS = (
    "setup", "identity", "config", "arrays", "metrics", "kept", "global", "units")
# A pruned device's structure, "units": "<layer>.self_attn" → kept KV groups and
# "<layer>.mlp" → kept MLP channels (int64, sorted, indices into the full layer; empty: the
# block was dropped whole; no key: never pruned). See fedapp.pruning.units.
# A pruned client names its kept indices in its "kept" ArrayRecord
# "<peft module key>.kept-out" and "<peft module key>.kept-in" (int64, empty if dropped).
KEPT_OUT, KEPT_IN = ".kept-out", ".kept-in"
NO_SETUP = "no run setup"  # a client's error reason when it never received the RunSetup
NO_GLOBAL = "no held global"  # ... when it cannot apply a global increment (wrong version)


def alpha_for(r: int, alpha_ratio: float) -> float:
    """lora_alpha of a rank-r LoRA: alpha_ratio · r, so every client's scaling is alpha_ratio."""
    return alpha_ratio * r


@dataclass(frozen=True)
class DataSpec(Record):
    """Which records, which columns, and how the held-out split is drawn."""

    path: str = field(default=DEFAULT_DATASET, metadata={
        "config": "dataset.path", "help": "packaged default, local file or Hub dataset"})
    instruction_column: str = field(default="q", metadata={"config": "dataset.instruction_column"})
    input_column: str = field(default="", metadata={"config": "dataset.input_column"})
    response_column: str = field(default="a", metadata={"config": "dataset.response_column"})
    label_column: str = field(default="category", metadata={"config": "dataset.label_column"})
    test_fraction: float = field(default=0.1, metadata={
        "config": "dataset.test_fraction", "help": "held-out share, drawn by `seed`"})
    seed: int = field(default=0, metadata={"config": "seed"})

    def __post_init__(self) -> None:
        require(bool(self.path), config_key(self, "path"), self.path, "a non-empty path or name")
        for name in ("instruction_column", "response_column"):
            value = getattr(self, name)
            require(isinstance(value, str) and bool(value), config_key(self, name), value,
                     "a column name")
        require(is_number(self.test_fraction) and 0 < self.test_fraction < 1,
                 config_key(self, "test_fraction"), self.test_fraction, "0 < x < 1")
        require(is_int(self.seed), config_key(self, "seed"), self.seed, "an integer")


SELECTIONS = ("all", "shed", "random")  # which examples a client trains on (client.selection)


@dataclass(frozen=True)
class SelectionSpec(Record):
    """Which of its examples a client trains on, chosen once on the device from its own
    partition (`fedapp.client.selection`, math in `strategies.shed_math`): all of them, a
    seeded random `budget` share, or SHED's quality-ordered clusters under that budget."""

    method: str = field(default="all", metadata={
        "config": "train.selection", "help": f"one of {SELECTIONS}"})
    budget: float = field(default=1.0, metadata={
        "config": "train.selection_budget", "help": "share of each partition kept, in (0, 1]"})
    clusters: int = field(default=8, metadata={"config": "train.selection_clusters"})
    proxy_examples: int = field(default=8, metadata={
        "config": "train.selection_proxy_examples", "help": "the validation slice of v(S)"})
    permutations: int = field(default=64, metadata={
        "config": "train.selection_permutations", "help": "Monte Carlo Shapley, > 10 clusters"})

    def __post_init__(self) -> None:
        require(self.method in SELECTIONS, config_key(self, "method"), self.method,
                str(list(SELECTIONS)))
        require(is_number(self.budget) and 0 < self.budget <= 1, config_key(self, "budget"),
                self.budget, "a fraction 0 < x <= 1 of each client's examples")
        for name in ("clusters", "proxy_examples", "permutations"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, config_key(self, name), value, "an int >= 1")


@dataclass(frozen=True)
class RunSetup(Record):
    """Everything a client needs that stays the same for the whole run."""

    model_path: str = field(metadata={"config": "model.path"})
    quantization: str = field(metadata={"config": "model.quantization",
                                        "help": f"one of {QUANTIZATIONS}"})
    target_modules: tuple[str, ...] = field(metadata={"config": "lora.target_modules",
                                                      "tuple": True})
    lr: float = field(metadata={"config": "train.lr"})
    batch_size: int = field(metadata={"config": "train.batch_size"})
    max_length: int = field(metadata={"config": "train.max_length"})
    partitioner: str = field(metadata={"config": "partitioner.name"})
    partitioner_alpha: float = field(metadata={"config": "partitioner.alpha"})
    wire_dtype: str = field(default="float16", metadata={"config": "train.wire_dtype"})
    num_threads: int = field(default=0, metadata={"config": "train.num_threads",
                                                  "help": "torch threads; 0 = torch's default"})
    loss: str = field(default="chunked", metadata={
        "config": "train.loss", "help": f"one of {LOSSES}: chunked never holds full logits"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "config": "train.gradient_checkpointing",
        "help": "recompute each layer's activations in the backward pass: less memory, slower"})
    release_memory: bool = field(default=False, metadata={
        "config": "train.release_memory",
        "help": "return freed activation memory to the OS at once: less memory, slower"})
    fp32_compute: bool = field(default=False, metadata={
        "config": "train.fp32_compute",
        "help": "4-bit layers compute in fp32, not bf16: no bf16 copies, slower on CPU"})
    pad_multiple: int = field(default=1, metadata={
        "config": "train.pad_multiple",
        "help": "training batches padded to a multiple of this length: fewer shapes"})
    data: DataSpec = field(default_factory=DataSpec, metadata={"record": DataSpec})
    selection: SelectionSpec = field(default_factory=SelectionSpec,
                                     metadata={"record": SelectionSpec})

    def __post_init__(self) -> None:
        require(not isinstance(self.target_modules, str), config_key(self, "target_modules"),
                 self.target_modules, "a non-empty list of module names")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        require(isinstance(self.model_path, str) and bool(self.model_path),
                 config_key(self, "model_path"), self.model_path,
                 "a Hugging Face model folder, a Hub id, or 'smollm2-135m-instruct'")
        require(self.quantization in QUANTIZATIONS, config_key(self, "quantization"),
                 self.quantization, str(list(QUANTIZATIONS)))
        require(bool(self.target_modules) and all(isinstance(m, str) and m and "," not in m
                                                   for m in self.target_modules),
                 config_key(self, "target_modules"), list(self.target_modules),
                 "a non-empty list of module names")
        require(is_number(self.lr) and self.lr > 0, config_key(self, "lr"), self.lr, "a number > 0")
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            require(is_int(value) and value > 0, config_key(self, name), value, "a positive integer")
        require(self.partitioner in PARTITIONERS, config_key(self, "partitioner"), self.partitioner,
                 str(list(PARTITIONERS)))
        if self.partitioner == "dirichlet":
            require(is_number(self.partitioner_alpha) and self.partitioner_alpha > 0,
                     config_key(self, "partitioner_alpha"), self.partitioner_alpha, "> 0")
        require(self.wire_dtype in WIRE_DTYPES, config_key(self, "wire_dtype"), self.wire_dtype,
                 str(list(WIRE_DTYPES)))
        require(is_int(self.num_threads) and self.num_threads >= 0, config_key(self, "num_threads"),
                 self.num_threads, "an integer >= 0")
        require(self.loss in LOSSES, config_key(self, "loss"), self.loss, str(list(LOSSES)))
        require(is_int(self.pad_multiple) and 1 <= self.pad_multiple <= self.max_length,
                 config_key(self, "pad_multiple"), self.pad_multiple,
                 f"an integer from 1 (no padding beyond the batch's longest) to "
                 f"train.max_length ({self.max_length})")
        for name in ("gradient_checkpointing", "release_memory", "fp32_compute"):
            require(isinstance(getattr(self, name), bool), config_key(self, name),
                     getattr(self, name), "true or false")
        if self.partitioner != "iid":
            require(bool(self.data.label_column), "dataset.label_column",
                     self.data.label_column, f"a column name (partitioner.name="
                     f"{self.partitioner!r} groups clients by label)")


@dataclass(frozen=True)
class PruneOrder(Record):
    """FedSpine: the device's copy, at the structure it `reached` (sent as "units", pruned to
    `reached` of the full model's attention / MLP parameters), is pruned on to `ratio` in
    `slices` slices, tuning LoRA `tune_steps` steps after each slice (within the round's
    `local_steps`), scoring units by `criterion` (fisher / taylor: the first slice on
    `calibration` batches of its data, later ones on the tuning steps' gradients); the client then
    measures its loss on a probe batch before and after, for the server's bandit. No step
    prunes past the device's final ratio `target` (`fedapp.pruning.surgery.plan_pruning`).
    `allocation`: the same share of every layer ("uniform": a stock shape) or units ranked
    across layers ("global", fisher / taylor only)."""

    ratio: float = field(metadata={"config": "scenario.devices.<class>.sparsity"})
    criterion: str = field(default="fisher", metadata={"config": "strategy.prune.criterion"})
    slices: int = field(default=2, metadata={"config": "strategy.prune.slices"})
    tune_steps: int = field(default=20, metadata={"config": "strategy.prune.tune_steps"})
    reached: float = field(default=0.0, metadata={"help": "the ratio of the structure sent"})
    calibration: int = field(default=8, metadata={"config": "strategy.prune.calibration"})
    target: float = field(default=0.0, metadata={"help": "the device's final ratio"})
    allocation: str = field(default="uniform", metadata={"config": "strategy.prune.allocation"})

    def __post_init__(self) -> None:
        require(self.allocation in ALLOCATIONS, config_key(self, "allocation"),
                 self.allocation, str(list(ALLOCATIONS)))
        require(self.allocation != "global" or self.criterion in GLOBAL_CRITERIA,
                 config_key(self, "criterion"), self.criterion, f"{list(GLOBAL_CRITERIA)} with "
                 "allocation 'global' (their scores estimate a loss change, so they compare "
                 "across layers)")
        for name in ("ratio", "target"):
            value = getattr(self, name)
            require(is_number(value) and 0 <= value < 1, config_key(self, name), value,
                    f"0 <= {name} < 1")
        require(is_number(self.reached) and 0 <= self.reached <= self.ratio,
                 config_key(self, "reached"), self.reached, f"0 <= reached <= ratio ({self.ratio})")
        require(self.criterion in CRITERIA, config_key(self, "criterion"), self.criterion,
                 str(list(CRITERIA)))
        for name in ("slices", "tune_steps", "calibration"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, config_key(self, name), value, "an int >= 1")


@dataclass(frozen=True)
class ZoOrder(Record):
    """FedKSeed: train the LoRA's B by zeroth-order steps, each along the perturbation of
    one of `seeds` candidate seeds of run `run_seed` (drawn by `sampling`), with step `lr`
    and perturbation scale `eps`; the arrays are the K accumulated scalars
    (`strategies.kseed_math`)."""

    seeds: int = field(metadata={"config": "strategy.seeds"})
    eps: float = field(metadata={"config": "strategy.eps"})
    lr: float = field(metadata={"config": "strategy.zo_lr"})
    sampling: str = field(metadata={"config": "strategy.sampling"})
    run_seed: int = field(metadata={"config": "seed"})

    def __post_init__(self) -> None:
        require(is_int(self.seeds) and self.seeds >= 1, config_key(self, "seeds"), self.seeds,
                 "an int >= 1 (K candidate seeds)")
        for name in ("eps", "lr"):
            value = getattr(self, name)
            require(is_number(value) and value > 0, config_key(self, name), value,
                     "a finite number > 0")
        require(self.sampling in ZO_SAMPLINGS, config_key(self, "sampling"), self.sampling,
                 str(list(ZO_SAMPLINGS)))
        require(is_int(self.run_seed), config_key(self, "run_seed"), self.run_seed, "an integer")


@dataclass(frozen=True)
class PipeOrder(Record):
    """FedPipe: the device's adapter structure, one LoRA rank per target module of the
    model in sorted peft-key order (`strategies.pipe_math.module_order`); 0: no LoRA on that
    module. Every module's lora_alpha is alpha_ratio · its rank, so all share one scaling.
    FedBiOT: `layers` names the decoder layers the device runs (its emulator and adapter;
    the others are skipped and never loaded) and `ranks` covers those layers' modules only;
    empty: every layer."""

    ranks: tuple[int, ...] = field(metadata={"config": "pipe-ranks", "tuple": True})
    layers: tuple[int, ...] = field(default=(), metadata={"config": "pipe-layers",
                                                          "tuple": True})

    def __post_init__(self) -> None:
        try:
            ranks = tuple(int(r) for r in self.ranks)
        except (TypeError, ValueError):
            ranks = ()
        require(bool(ranks) and all(r >= 0 for r in ranks) and any(ranks),
                 config_key(self, "ranks"), self.ranks, "one rank >= 0 per target module, at "
                 "least one of them > 0")
        object.__setattr__(self, "ranks", ranks)
        try:
            layers = tuple(int(i) for i in self.layers if i != "")
        except (TypeError, ValueError):
            layers = (-1,)
        require(all(i >= 0 for i in layers) and list(layers) == sorted(set(layers)),
                 config_key(self, "layers"), self.layers, "ascending layer indices >= 0")
        object.__setattr__(self, "layers", layers)


@dataclass(frozen=True)
class TrainOrder(Record):
    """One client's orders for one round."""

    server_round: int
    lora_r: int = field(metadata={"config": "strategy.ranks"})
    lora_alpha: float = field(metadata={"config": "lora.alpha_ratio",
                                        "help": "alpha_for(lora_r, alpha_ratio)"})
    local_steps: int = field(metadata={"config": "train.local_steps"})
    seed: int = field(metadata={"config": "seed"})
    global_mode: str = field(default="none", metadata={"help": f"one of {GLOBAL_MODES}"})
    # False: lora_A stays at its initial value and only lora_B is trained and sent (FFA-LoRA).
    train_lora_a: bool = True
    # True: train on the pooled training partitions of every client (the centralized upper
    # bound, strategies.centralized), not on this client's own.
    pooled: bool = False
    prune: PruneOrder | None = field(default=None, metadata={"record": PruneOrder,
                                                             "optional": True})
    zo: ZoOrder | None = field(default=None, metadata={"record": ZoOrder, "optional": True})
    pipe: PipeOrder | None = field(default=None, metadata={"record": PipeOrder,
                                                           "optional": True})

    def __post_init__(self) -> None:
        require(is_int(self.server_round) and self.server_round >= 1,
                 "server-round", self.server_round, "an int >= 1")
        require(is_int(self.lora_r) and self.lora_r > 0, config_key(self, "lora_r"), self.lora_r,
                 "a positive integer")
        require(is_number(self.lora_alpha) and self.lora_alpha > 0, config_key(self, "lora_alpha"),
                 self.lora_alpha, "a number > 0 (lora_alpha = alpha_ratio · r)")
        require(is_int(self.local_steps) and self.local_steps > 0, config_key(self, "local_steps"),
                 self.local_steps, "a positive integer")
        require(is_int(self.seed), config_key(self, "seed"), self.seed, "an integer")
        require(self.global_mode in GLOBAL_MODES, "global-mode", self.global_mode,
                 str(list(GLOBAL_MODES)))
        require(isinstance(self.train_lora_a, bool), "train-lora-a", self.train_lora_a,
                 "true or false")
        require(isinstance(self.pooled, bool), "pooled", self.pooled, "true or false")
        if self.zo is not None:
            require(self.prune is None and not self.pooled and not self.train_lora_a,
                    "zo", self.zo, "zeroth-order orders train lora_B only, unpruned, on the "
                    "client's own data")
        if self.pipe is not None:
            require(self.prune is None and self.zo is None and not self.pooled
                    and self.train_lora_a and max(self.pipe.ranks) == self.lora_r, "pipe",
                    self.pipe, f"a per-module structure whose largest rank is lora_r "
                    f"({self.lora_r}), unpruned, first-order, on the client's own data")
        if self.prune is not None:
            require(self.prune.slices <= self.local_steps, config_key(self.prune, "slices"),
                     self.prune.slices, f"at most train.local_steps={self.local_steps} (every "
                     "slice is tuned at least one step)")
            require(not self.pooled, "pooled", self.pooled, "false in a pruned round (the "
                    "pooled upper bound trains the whole model)")
            require(self.global_mode in ("none", "frozen"), "global-mode", self.global_mode,
                     "'none' or 'frozen' in a pruned round (the global update stays beside "
                     "the pruned base)")

    @property
    def scaling(self) -> float:
        """peft's scaling of this order's LoRA: lora_alpha / r."""
        return self.lora_alpha / self.lora_r
