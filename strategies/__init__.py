"""Aggregation strategies for federated LoRA, one module per algorithm: a library that
depends only on flwr, torch and numpy. The app (`fedapp`) builds one from its Hydra config
(`_target_` in conf/strategy/*.yaml); `protocol` is the message contract with the clients.
"""

from strategies.base import LoraStrategy
from strategies.fedit import FedIT
from strategies.fedspine import FedSpine
from strategies.ffa import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.oneshot import OneShot
from strategies.zeropad import ZeroPad

__all__ = [
    "FFALoRA",
    "FLoRA",
    "FedIT",
    "FedSpine",
    "FlexLoRA",
    "LoraStrategy",
    "OneShot",
    "ZeroPad",
]
