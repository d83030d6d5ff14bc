"""Aggregation strategies for federated LoRA, one module per algorithm."""

from strategies.base import LoraStrategy
from strategies.fedit import FedIT
from strategies.flora import FLoRA

STRATEGIES: dict[str, type[LoraStrategy]] = {"fedit": FedIT, "flora": FLoRA}

__all__ = ["STRATEGIES", "FedIT", "FLoRA", "LoraStrategy"]
