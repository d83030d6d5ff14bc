"""Server checkpoints: everything a crashed run needs to continue from its last round.

After every completed round the server writes `<run dir>/checkpoint.pt` atomically (a
temporary file, then `os.replace`): the round number, the global arrays, the strategy's own
state (e.g. bandit statistics), the traffic counters, and the torch RNG state. Randomness
that decides a run (client sampling, client seeds, batch order) is derived from the config
seed and the round number, so a resumed run makes exactly the choices the original would
(FedSpine's bandits also learn from measured compute times, which no two runs repeat
exactly; their statistics are restored as they were).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    server_round: int
    arrays: dict[str, torch.Tensor]
    strategy_state: dict = field(default_factory=dict)
    recorder_state: dict = field(default_factory=dict)
    torch_rng: torch.Tensor | None = None


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write atomically: a reader sees the previous checkpoint or this one, never half."""
    target = run_dir / CHECKPOINT
    tmp = target.with_suffix(".tmp")
    torch.save(ckpt.__dict__, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def load_checkpoint(run_dir: Path) -> Checkpoint:
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"resume={str(run_dir)!r}: no {CHECKPOINT} there; allowed: the "
                                "run directory of a run that completed at least one round")
    return Checkpoint(**torch.load(path, weights_only=False))
