"""FedPipe (Fang et al., 2024): each device's adapter structure, which target modules get LoRA
and at which rank, chosen automatically from importance and its budget.

Per device class (`scenario.devices`: compute slow-down, memory budget) the window, the top
layers whose modules may get LoRA, is the deepest whose estimated training memory and step
time fit the budget (`strategies.pipe_math.window_depth`, with `strategy.costs` fitted to
measured peaks and step times by `scripts/bench_fedpipe.py`, and `strategy.step_seconds`
the per-step time budget of every device, null: none). A budget no window fits is refused
when the strategy is built.

In a device's first round every module of its window trains at the grid's largest rank;
its accepted update gives each module's importance (‖s B A‖_F, its own data). From then on
the device trains the ranks that importance implies (`ranks_from_importance`: modules below
`min_share` of the most important get none), sent as a `PipeOrder` (one rank per target
module, 0 = none). Replies are checked against exactly that structure. The server stacks
each module's updates over the clients that trained it, weights renormalised per module
(`stack_per_module`), into the global update G as FLoRA does (re-compressed to
`rank_budget`, held at wire precision); every device trains a fresh structured LoRA beside
the frozen G. The downlink is FLoRA's, versioned: a client accepted in round t gets, in
round t+1, only the other clients' uploads of round t ("<slot>/<peft key>" arrays, with
their weights: `ModuleSlots`) and rebuilds G_t bitwise (`pipe_math.slots_delta`); everyone
else gets all of G less its all-zero modules (a module nobody trained yet).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.logger import log

from strategies.base import ClientIdentity
from strategies.devices import DeviceProfile
from strategies.flora import FLoRA, RoundSlots
from strategies.global_version import Increment
from strategies.lora_math import (
    Factors,
    LoraUpdate,
    digest,
    join_factors,
    split_factors,
)
from strategies.pipe_math import (
    encode_slots,
    estimate,
    lora_parameters,
    module_layers,
    module_order,
    pipe_costs,
    ranks_from_importance,
    stack_per_module,
    update_importance,
    window,
    window_depth,
)
from strategies.protocol import ARRAYS, PipeOrder, TrainOrder
from strategies.replies import expected_shapes, read_arrays, reply_weight
from strategies.summary import ClientOutcome


@dataclass(frozen=True)
class ModuleSlots(RoundSlots):
    """A round's slots when each covers its own modules: `parts` are (weight, factors)."""

    scaling: float = 1.0

    def increment_for(self, name: str, rank_budget: int) -> tuple[ArrayRecord, Increment]:
        own = self.names.index(name)
        slots = [f for _, f in self.parts]
        return ArrayRecord(encode_slots(slots, own)), Increment(
            rank_budget=rank_budget, ranks=tuple(max(a.shape[0] for a, _ in f.values())
                                                 for f in slots),
            coefficients=tuple(w for w, _ in self.parts), own_slot=own,
            own_digest=digest(join_factors(slots[own])), per_module=True,
            scaling=self.scaling)


DEFAULT_COSTS = {"fixed_mb": 0.0, "layer_mb": 0.0, "lora_mb_per_mparam": 0.0,
                 "forward_s": 0.0, "backward_s": 0.0}


class FedPipe(FLoRA):
    name = "fedpipe"
    supports_dp = False
    picks_ranks = True  # each device's structure follows its budget and importance
    increments = True  # a returning client gets the round's other slots (per module)
    cappable = False  # clients hold only the modules they need
    grid_key = "strategy.rank_grid"  # the config key of the ranks, in errors

    def __init__(self, *args, rank_grid: Sequence[int] = (4, 8, 16),
                 step_seconds: float | None = None, min_share: float = 0.25,
                 costs: Mapping | None = None, **kwargs) -> None:
        if kwargs.get("dp"):
            raise ValueError(f"dp.enabled=true; allowed: false with strategy={self.name} (its "
                             "per-module stacking is not what the clipping and noise cover)")
        super().__init__(*args, ranks=None, **kwargs)
        grid = list(rank_grid)
        if not grid or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0
                               for r in grid):
            raise ValueError(f"strategy.rank_grid={grid}; allowed: a non-empty list of "
                             "positive integers")
        self.check_ranks(grid, self.grid_key)
        if self.rank_budget < max(grid):
            raise ValueError(f"strategy.rank_budget={self.rank_budget} is below the largest "
                             f"grid rank {max(grid)}; allowed: >= {max(grid)}")
        if step_seconds is not None and (isinstance(step_seconds, bool) or not isinstance(
                step_seconds, int | float) or not step_seconds > 0):
            raise ValueError(f"strategy.step_seconds={step_seconds!r}; allowed: null (no time "
                             "budget) or a number > 0")
        if isinstance(min_share, bool) or not isinstance(min_share, int | float) \
                or not 0 <= min_share <= 1:
            raise ValueError(f"strategy.min_share={min_share!r}; allowed: 0 <= x <= 1")
        self.grid, self.step_seconds, self.min_share = sorted(grid), step_seconds, min_share
        self.costs = pipe_costs(DEFAULT_COSTS if costs is None else costs)
        self.layers = module_layers(self.module_shapes)
        self.order_keys = module_order(self.module_shapes)
        # per device class, fail now (a config composed without the model has no modules:
        # the ServerApp builds the strategy again with them before round 1)
        self.depths = {d.name: self.depth_for(d) for d in self.devices} \
            if self.module_shapes else {}
        self.importance: dict[str, dict[str, float]] = {}  # per client name, once measured

    def depth_for(self, device: DeviceProfile) -> int:
        """The device's window depth; ValueError when no window fits its budget."""
        depth = window_depth(self.module_shapes, self.layers, self.grid[-1], self.costs,
                             device.memory_mb, device.slowdown, self.step_seconds)
        if depth == 0:
            num_layers = max(self.layers.values()) + 1
            top = window(self.layers, 1)
            memory, seconds = estimate(self.costs, 1, num_layers, lora_parameters(
                self.module_shapes, dict.fromkeys(top, self.grid[-1])), device.slowdown)
            raise ValueError(
                f"scenario.devices.{device.name} (memory_mb={device.memory_mb:g}, slowdown "
                f"{device.slowdown:g}) fits no FedPipe structure: even the top layer at rank "
                f"{self.grid[-1]} needs an estimated {memory:.0f} MB and {seconds:.2f} s per "
                f"step (strategy.step_seconds={self.step_seconds}); allowed: a larger "
                "memory_mb or step_seconds, a smaller strategy.rank_grid, or "
                "strategy.costs that match the model")
        return depth

    def structure_for(self, client: ClientIdentity) -> dict[str, int]:
        """{module: rank} over the device's window (module docstring)."""
        modules = window(self.layers, self.depths[self.device_for(client).name])
        measured = self.importance.get(client.name)
        importance = {m: measured.get(m, 0.0) if measured else 1.0 for m in modules}
        ranks = ranks_from_importance(importance, self.grid, self.min_share)
        return {m: r for m, r in ranks.items() if r > 0}

    def order_for(self, server_round: int, client: ClientIdentity) -> TrainOrder:
        structure = self.structure_for(client)
        return self.make_order(server_round, max(structure.values()), pipe=PipeOrder(
            ranks=tuple(structure.get(m, 0) for m in self.order_keys)))

    def client_scaling(self, client: ClientIdentity) -> float:
        return self.alpha_ratio  # lora_alpha = alpha_ratio · r for every module

    def client_state(self, client: ClientIdentity,
                     state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """G less the modules no device ever trained (all zeros: the client's frozen
        adapter treats a missing module as zero)."""
        return join_factors({m: (a, b) for m, (a, b) in split_factors(state).items()
                             if bool(b.any())})

    def parse_update(self, content: RecordDict, order: TrainOrder) -> LoraUpdate:
        """The reply must hold exactly the ordered structure's factors."""
        weight = reply_weight(content)
        ranks = zip(self.order_keys, order.pipe.ranks, strict=True)  # type: ignore[union-attr]
        wanted = {k: shape for m, r in ranks if r
                  for k, shape in expected_shapes({m: self.module_shapes[m]}, r).items()}
        state = read_arrays(content.array_records[ARRAYS], wanted,
                            f"structured adapter of {len(wanted) // 2} modules")
        return LoraUpdate(split_factors(state), order.scaling, weight)

    def check_reply(self, server_round: int, node_id: int, msg
                    ) -> tuple[str, ClientOutcome, LoraUpdate | None]:
        name, outcome, update = super().check_reply(server_round, node_id, msg)
        if update is not None and name not in self.importance:  # its profile round
            self.importance[name] = update_importance(update)
        if update is not None:
            outcome.extra.update({"lora-modules": float(len(update.factors)),
                                  "lora-params": float(lora_parameters(
                                      self.module_shapes, {m: a.shape[0] for m, (a, _) in
                                                           update.factors.items()}))})
        return name, outcome, update

    def round_update(self, server_round: int, updates: list[LoraUpdate]
                     ) -> tuple[Factors, dict[str, float], list[tuple[float, Factors]]]:
        """Δ from the uploads as they came over the wire (what returning clients rebuild it
        from), and the slots: (weight, factors) per client."""
        return stack_per_module(updates, self.module_shapes), {}, [
            (u.weight, u.factors) for u in updates]

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        arrays, figures = super().aggregate_updates(server_round, updates)
        if self.slots is not None:
            self.slots = ModuleSlots(self.slots.server_round, self.slots.names,
                                     self.slots.parts, self.alpha_ratio)
        return arrays, figures

    def state_dict(self) -> dict:
        return {**super().state_dict(),
                "importance": {n: dict(v) for n, v in self.importance.items()}}

    def load_state(self, state: dict, arrays) -> None:
        super().load_state(state, arrays)
        self.importance = {n: {m: float(x) for m, x in v.items()}
                           for n, v in state.get("importance", {}).items()}

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), "depths": self.depths,
                "importance": self.importance}

    def summary(self) -> None:
        log(INFO, "\t├──> fedpipe: rank grid %s, min share %g, step budget %s s, windows "
            "(top layers) per device class %s", self.grid, self.min_share, self.step_seconds,
            self.depths)
        super().summary()
