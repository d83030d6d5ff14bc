"""A client's tokenised training partition: prepared once, then read from disk.

Preparing it takes `datasets`, flwr-datasets (pandas, pyarrow) and the tokenizer: about
150 MiB of a client's resident memory (scripts/bench_client.py measures it) that training
never uses again, and seconds of imports in every deployed round (a SuperNode starts a
fresh ClientApp process per message). So a client process that has not loaded `datasets`
prepares its partition in a short-lived helper process (`python -m fedapp.client.partition`)
that writes the examples of every partition of the split under the cache; every later
round, run, process and client of the split reads its file in milliseconds. A process that holds `datasets` already (the server, the test suite)
prepares in-process and writes the same file. The file name hashes everything that decides
the examples: model (tokenizer), data spec, partitioner, max length, the partition, and the
size and time of the local files involved.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import cache
from pathlib import Path

import torch

from fedapp.llm.helper import run_helper
from fedapp.llm.model import cache_dir, resolve_model_path
from strategies.protocol import RunSetup

FORMAT = 2  # bump when the examples' layout changes


def _file_stamp(path: str) -> list:
    """Size and mtime of a local file, or of every file in a local folder; [] otherwise."""
    target = Path(path).expanduser()
    files = sorted(target.iterdir()) if target.is_dir() else [target] if target.is_file() else []
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]


def partition_file(setup: RunSetup, num_partitions: int, partition_id: int) -> Path:
    """Where this partition's examples are kept, named by everything that decides them."""
    model = resolve_model_path(setup.model_path)
    key = {"format": FORMAT, "model": model, "model-files": _file_stamp(model),
           "data": setup.data.to_dict(), "data-files": _file_stamp(setup.data.path),
           "partitioner": setup.partitioner, "alpha": setup.partitioner_alpha,
           "max-length": setup.max_length, "partition": [partition_id, num_partitions]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "partitions" / f"{partition_id}-of-{num_partitions}-{digest}.pt"


def prepare(setup: RunSetup, num_partitions: int, partition_id: int, target: Path) -> None:
    """Load and partition (this process imports `datasets`), then tokenise and write,
    atomically, `target` and every other partition of the split not on disk yet: one
    helper process per split and machine instead of one per client (about 5 s each: a
    simulation of 100 clients paid it again for every client it sampled the first time).
    Each partition is a deterministic slice of data this process has read anyway."""
    from fedapp.llm.data import partitioner_for, tokenize_records
    from fedapp.llm.model import cached_tokenizer

    tokenizer = cached_tokenizer(setup.model_path)
    partitioner = partitioner_for(setup, num_partitions)
    for pid in range(num_partitions):
        path = target if pid == partition_id else partition_file(setup, num_partitions, pid)
        if pid != partition_id and path.exists():
            continue
        examples = tokenize_records(partitioner.load_partition(pid), setup.data, tokenizer,
                                    setup.max_length)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        torch.save({"examples": examples, "pad-token-id": int(tokenizer.pad_token_id)}, tmp)
        tmp.rename(path)


@cache
def partition_examples(setup: RunSetup, num_partitions: int,
                       partition_id: int) -> tuple[list[dict], int]:
    """(this client's tokenised examples, the pad token id), once per process."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} outside 0..{num_partitions - 1}")
    target = partition_file(setup, num_partitions, partition_id)
    if not target.exists():
        if "datasets" in sys.modules:
            prepare(setup, num_partitions, partition_id, target)
        else:
            run_helper("fedapp.client.partition", [json.dumps(setup.to_dict()),
                       str(num_partitions), str(partition_id), str(target)],
                       f"preparing partition {partition_id} of {num_partitions}")
    saved = torch.load(target, weights_only=True)
    return saved["examples"], saved["pad-token-id"]


if __name__ == "__main__":
    _setup, _n, _i, _target = sys.argv[1:5]
    prepare(RunSetup.from_dict(json.loads(_setup)), int(_n), int(_i), Path(_target))
