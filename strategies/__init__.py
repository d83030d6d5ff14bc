"""Aggregation strategies for federated LoRA, one module per algorithm: a library that
depends only on flwr, torch and numpy. The app (`fedapp`) builds one from its Hydra config
(`_target_` in conf/strategy/*.yaml); `protocol` is the message contract with the clients.

The strategy classes are imported on first use (`strategies.FLoRA`), so that importing
`strategies.protocol` alone loads neither torch nor Flower's server side.
"""

from __future__ import annotations

import importlib
from typing import Any

_CLASSES = {
    "Centralized": "centralized",
    "FFALoRA": "ffa",
    "FLoRA": "flora",
    "FedBiOT": "fedbiot",
    "FedIT": "fedit",
    "FedKSeed": "fedkseed",
    "FedPipe": "fedpipe",
    "FedSpine": "fedspine",
    "FlexLoRA": "flexlora",
    "LoraStrategy": "base",
    "OneShot": "oneshot",
    "ZeroPad": "zeropad",
}

__all__ = ["Centralized", "FFALoRA", "FLoRA", "FedBiOT", "FedIT", "FedKSeed", "FedPipe", "FedSpine",
           "FlexLoRA", "LoraStrategy", "OneShot", "ZeroPad"]


def __getattr__(name: str) -> Any:
    if name not in _CLASSES:
        raise AttributeError(f"module 'strategies' has no attribute {name!r}")
    return getattr(importlib.import_module(f"strategies.{_CLASSES[name]}"), name)
