"""Instruction data: load, hold out a test split, partition, tokenise, batch.

Every client and the server call the same `load_split` with the same seed, so the held-out
test split is identical everywhere and no client ever trains on it.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

from strategies.protocol import DEFAULT_DATASET, DataSpec, RunSetup

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100


def _resolve_data_files(path: str) -> str:
    if path == DEFAULT_DATASET:
        spec = importlib.util.find_spec("zaragoza_construction_faq")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "the default dataset needs the package 'zaragoza-construction-faq' "
                "(run scripts/setup.sh), or set dataset.path to a local file or Hub dataset"
            )
        return str(Path(spec.submodule_search_locations[0]) / "data" / "faq-en.jsonl")
    return path


def load_records(spec: DataSpec):  # -> datasets.Dataset
    """All records of the dataset named by `spec.path`, columns checked.

    `spec.path` is the packaged default, a local .json/.jsonl/.csv/.parquet file, or a
    Hugging Face Hub dataset name (its 'train' split).
    """
    import datasets

    source = _resolve_data_files(spec.path)
    suffix = Path(source).suffix.lower()
    if suffix in _FILE_BUILDERS:
        if not Path(source).exists():
            raise ValueError(f"dataset.path={spec.path!r}: no such file")
        ds = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=source, split="train")
    elif Path(source).exists():
        raise ValueError(
            f"dataset.path={spec.path!r} has suffix {suffix!r}; allowed: "
            f"{sorted(_FILE_BUILDERS)}, a Hub dataset name, or {DEFAULT_DATASET!r}"
        )
    else:
        ds = datasets.load_dataset(source, split="train")
    wanted = {
        "dataset.instruction_column": spec.instruction_column,
        "dataset.input_column": spec.input_column,
        "dataset.response_column": spec.response_column,
        "dataset.label_column": spec.label_column,
    }
    for key, column in wanted.items():
        if column and column not in ds.column_names:
            raise ValueError(f"{key}={column!r} is not a column of {spec.path!r}; "
                             f"its columns are {ds.column_names}")
    return ds


@cache
def load_split(spec: DataSpec):  # -> tuple[datasets.Dataset, datasets.Dataset]
    """(train, test): the test split is held out by `spec.seed`, the same everywhere."""
    ds = load_records(spec)
    split = ds.train_test_split(test_size=spec.test_fraction, seed=spec.seed)
    return split["train"], split["test"]


def make_partitioner(setup: RunSetup, num_partitions: int, num_labels: int):
    """A flwr-datasets partitioner: IID, Dirichlet(α) over labels, or natural label groups
    (`setup.partitioner`, whose name, α and label column RunSetup has checked)."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        GroupedNaturalIdPartitioner,
        IidPartitioner,
    )

    label_column = setup.data.label_column
    if setup.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if setup.partitioner == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by=label_column,
                                    alpha=setup.partitioner_alpha, min_partition_size=1,
                                    self_balancing=True, seed=setup.data.seed)
    # Natural: consecutive groups of labels, one group per client.
    group_size = math.ceil(num_labels / num_partitions)
    if math.ceil(num_labels / group_size) != num_partitions:
        raise ValueError(
            f"partitioner.name='natural' cannot split {num_labels} labels into "
            f"{num_partitions} groups; use at most {num_labels} clients with a count that "
            f"divides the labels evenly, or partitioner.name='dirichlet'"
        )
    return GroupedNaturalIdPartitioner(partition_by=label_column, group_size=group_size,
                                       sort_unique_ids=True)


def partitioner_for(setup: RunSetup, num_partitions: int):  # -> flwr-datasets Partitioner
    """The run's partitioner over the training split (never the held-out records)."""
    spec = setup.data
    train, _ = load_split(spec)
    if num_partitions > len(train):
        raise ValueError(f"scenario.num_clients={num_partitions} but only {len(train)} "
                         f"training examples; allowed: at most {len(train)} (one client per example)")
    num_labels = len(set(train[spec.label_column])) if spec.label_column else 0
    part = make_partitioner(setup, num_partitions, num_labels)
    part.dataset = train
    return part


def load_partition(setup: RunSetup, num_partitions: int,
                   partition_id: int):  # -> datasets.Dataset
    """The training records of one client (never any of the held-out test records)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} outside 0..{num_partitions - 1}")
    return partitioner_for(setup, num_partitions).load_partition(partition_id)


def partition_sizes(setup: RunSetup, num_partitions: int) -> list[int]:
    """Every client's number of training records, partitioned exactly as the clients will.
    The server calls it before training, so a split the data cannot give (more clients than
    examples or label groups, an empty partition) fails there, naming the keys, instead of
    in every client round after round."""
    part = partitioner_for(setup, num_partitions)
    sizes = [part.load_partition(i).num_rows for i in range(num_partitions)]
    if empty := [i for i, n in enumerate(sizes) if n == 0]:
        raise ValueError(f"partitioner.name={setup.partitioner!r} leaves partitions {empty} of "
                         f"scenario.num_clients={num_partitions} empty; allowed: fewer clients "
                         "or another partitioner (iid gives every client examples)")
    return sizes


def prompt_text(record: dict, spec: DataSpec, tokenizer) -> str:
    """The prompt a response follows: the chat template when the tokenizer has one, else an
    Alpaca-style prompt."""
    instruction = str(record[spec.instruction_column])
    if spec.input_column and record.get(spec.input_column):
        instruction = f"{instruction}\n\n{record[spec.input_column]}"
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


@cache
def _bos_expected(tokenizer) -> int | None:
    """The BOS id when this tokenizer's own encoding begins every text with it (Llama 3,
    Gemma, Mistral ...), else None (SmolLM2, Qwen2, GPT-2 ...): the model was trained that
    way, so every sequence it is given should start the same."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def encode_prompt(prompt: str, tokenizer) -> list[int]:
    """The prompt's token ids as the model expects them: special tokens the text spells (a
    chat template's own BOS, turn markers) are read as such, and the BOS is added when the
    model's format begins with one and the text did not write it (no chat template: the
    Alpaca fallback). Training, evaluation, scoring and generation all encode prompts here."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = _bos_expected(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def prompt_and_response(prompt: str, response: str, tokenizer,
                        max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + response + eos, with labels only over the response."""
    prompt_ids = encode_prompt(prompt, tokenizer)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def format_example(record: dict, spec: DataSpec, tokenizer, max_length: int) -> dict:
    """Tokenise one record; labels cover only the response (prompt tokens are ignored)."""
    return prompt_and_response(prompt_text(record, spec, tokenizer),
                               str(record[spec.response_column]), tokenizer, max_length)


def tokenize_records(records, spec: DataSpec, tokenizer, max_length: int) -> list[dict]:
    """Tokenise every record, dropping those whose response was truncated away."""
    examples = [format_example(r, spec, tokenizer, max_length) for r in records]
    return [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"][1:])]


def first_batches(examples: list[dict], batch_size: int, pad_token_id: int, count: int
                  ) -> list[dict[str, torch.Tensor]]:
    """The first `count` batches of `examples` in order (fewer when they run out): a
    pruning round's calibration batches."""
    return [collate(examples[i:i + batch_size], pad_token_id)
            for i in range(0, min(len(examples), count * batch_size), batch_size)]


def collate(examples: list[dict], pad_token_id: int, multiple: int = 1
            ) -> dict[str, torch.Tensor]:
    """Right-pad a batch: (batch, width) input_ids, attention_mask, labels, `width` the
    longest example's length rounded up to a multiple of `multiple` (padding is masked out
    and never labelled, so the loss is the same)."""
    width = -(-max(len(e["input_ids"]) for e in examples) // multiple) * multiple
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_batches(examples: list[dict], batch_size: int, pad_token_id: int,
                  seed: int, multiple: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches: a client's local steps may exceed one epoch; each padded
    to a multiple of `multiple` tokens (`collate`)."""
    if not examples:
        raise ValueError("this client's partition has no usable training examples")
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield collate([examples[i] for i in order[start:start + batch_size]], pad_token_id,
                          multiple)
