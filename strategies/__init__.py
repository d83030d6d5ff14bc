"""Aggregation strategies for federated LoRA, one module per algorithm."""

from strategies.base import LoraStrategy
from strategies.fedit import FedIT
from strategies.fedspine import FedSpine
from strategies.ffa import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.oneshot import OneShot
from strategies.zeropad import ZeroPad

STRATEGIES: dict[str, type[LoraStrategy]] = {
    s.name: s for s in (FedIT, FLoRA, ZeroPad, FlexLoRA, FFALoRA, OneShot, FedSpine)}

__all__ = [
    "STRATEGIES",
    "FFALoRA",
    "FLoRA",
    "FedIT",
    "FedSpine",
    "FlexLoRA",
    "LoraStrategy",
    "OneShot",
    "ZeroPad",
]
