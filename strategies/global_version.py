"""How a train message's global arrays are read (FLoRA's downlink, `strategies.flora`):
`GlobalVersion` says which version of the global update they give, and whether they are the
whole of it, an `Increment` that a client holding the previous version completes with its
own last upload, or a low-rank `Correction` of the copy it holds
(`strategies.downlink_math`). A client that cannot use them (it lost its copy) fails with
`strategies.protocol.NO_GLOBAL` and gets the whole global next time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from strategies.records import Record, is_int, is_number, require


@dataclass(frozen=True)
class Increment(Record):
    """The arrays are round `version`'s stacked update Δ less the receiving client's own
    slot: the other slots side by side (lora_A rows, lora_B columns), in slot order.

    Slot j has rank `ranks[j]` and coefficient `coefficients[j]` (p_j · s_j); the client's
    own slot is `own_slot`, its upload of that round, which it recognises by `own_digest`
    (`lora_math.digest` of the upload as the server accepted it)."""

    rank_budget: int
    ranks: tuple[int, ...] = field(metadata={"tuple": True})
    coefficients: tuple[float, ...] = field(metadata={"tuple": True})
    own_slot: int
    own_digest: str
    # FedPipe: slots cover different modules; the arrays are keyed "<slot>/<peft key>",
    # the coefficients are the slots' aggregation weights and `scaling` their one scaling
    # (strategies.pipe_math.slots_delta)
    per_module: bool = False
    scaling: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        require(is_int(self.rank_budget) and self.rank_budget > 0, "increment-rank-budget",
                 self.rank_budget, "a positive integer")
        require(bool(self.ranks) and all(r > 0 for r in self.ranks), "increment-ranks",
                 self.ranks, "positive ranks, one per slot")
        require(len(self.coefficients) == len(self.ranks)
                and all(map(math.isfinite, self.coefficients)), "increment-coefficients",
                 self.coefficients, f"{len(self.ranks)} finite numbers, one per slot")
        require(is_int(self.own_slot) and 0 <= self.own_slot < len(self.ranks),
                 "increment-own-slot", self.own_slot, f"0 <= slot < {len(self.ranks)}")
        require(isinstance(self.per_module, bool), "increment-per-module", self.per_module,
                "true or false")
        require(is_number(self.scaling), "increment-scaling", self.scaling, "a finite number")


@dataclass(frozen=True)
class Correction(Record):
    """The arrays are a low-rank correction C of the copy of the global that this client's
    train message of version `held_version` gave it: it then holds `next_global`(copy, C,
    `rank_budget`), an approximation of version `version` (`strategies.downlink_math`)."""

    rank_budget: int
    held_version: int

    def __post_init__(self) -> None:
        require(is_int(self.rank_budget) and self.rank_budget > 0, "correction-rank-budget",
                 self.rank_budget, "a positive integer")
        require(is_int(self.held_version) and self.held_version >= 0,
                "correction-held-version", self.held_version, "an int >= 0")


@dataclass(frozen=True)
class GlobalVersion(Record):
    """Which global update a train message's arrays give: version t is the global after
    round t (0: none yet). Without `increment` or `correction` the arrays are all of it;
    an increment takes a client from version − 1 to `version` exactly; a correction takes
    it from what it holds towards `version`."""

    version: int
    increment: Increment | None = field(default=None, metadata={"record": Increment,
                                                                "optional": True})
    correction: Correction | None = field(default=None, metadata={"record": Correction,
                                                                  "optional": True})

    def __post_init__(self) -> None:
        require(is_int(self.version) and self.version >= 0, "global-version", self.version,
                 "an int >= 0")
        require(self.increment is None or self.version >= 1, "global-version", self.version,
                 "an int >= 1 with an increment (it follows version - 1)")
        require(self.increment is None or self.correction is None, "global-correction",
                self.correction, "none with an increment (the arrays are one or the other)")
