"""FedSpine (Yao et al., 2025): every device ends with a pruned, fine-tuned model it deploys;
a bandit per device picks the path there (how far it prunes each round, which LoRA rank).

**Same sparsity by construction.** Each device's final sparsity (the share of its attention /
MLP parameters its deployed model drops) is fixed before training: its class's
`scenario.devices.<class>.sparsity`, or else the least its memory budget needs (the smallest
ratio, to 0.01, at which the memory estimate below fits with the grid's smallest rank).
A device prunes only further, never back; the ratio it trains at in round t is

    ratio_t = target                                       in the final round (`num_rounds`)
    ratio_t = min(target, max(reached, arm ratio, need(arm rank)))    before it

with `reached` the ratio of its structure so far and need(r) the least ratio at which the
arm's rank fits its memory budget. So every device reaches its target in the last round at
the latest, at the shapes one step to it gives (the order names the target; no step prunes
past it, `fedapp.pruning.surgery.plan_pruning`); the arm's ratio only says how early.
Arms whose rank fits at no ratio up to the target are never played.

**Rounds.** For each selected device its bandit (`strategies.bandit`, keyed by the client's
stable name) picks an arm (prune ratio, rank) among the feasible ones (one of each set that
trains alike, `feasible_for`), unplayed arms scored by a predicted reward
(`strategies.spine_prior`: a cost model, and the pruning round an arm owes when it stops
short of the target); the order says the ratio to reach and the ratio reached, and the
message carries the device's structure (`protocol.UNITS`, kept by the server) and the
frozen global update G cut to it. The client loads that structure (the copy it stored, else
sliced from the base), prunes on to the round's ratio, tunes a LoRA of that rank beside G
(`fedapp.client`), and replies with its factors at the pruned shapes, the rows / columns they
cover and the structure it reached (checked by `strategies.units`: only ever a subset of
what it had). The server scatters the factors to full shape (zeros at pruned units,
`strategies.scatter`) and FLoRA-stacks them into G, which stays unpruned. Each device's
deployed model is its structure + G cut to it (`deployments()`, exported by the ServerApp).
Then each bandit learns its arm's reward (`spine_reward.reward`), its gain per unit of time:

    reward_k = clip(g · (median_j T_j / T_k)^λ, −1, 1),  g = clip((L_before − L_after) / L_before, ±1)

(a negative g divided by that speed), L the client's loss on its own probe batch: L_before
of the model it started from (its structure + G), L_after of its pruned, tuned model, so
this round's pruning damage is charged (`reward_from: pruned`: L_before just after the
round's last pruning slice: an arm is rewarded for what its training repaired and learned);
T its completion time (`completion-seconds`: compute × its device's slow-down + bytes over
its links), λ = `time_weight`; `reward_scale: round` divides it by the round's median |g|.

The memory a client would need for an arm is `spine_memory.estimated_memory_mb` with this
strategy's `memory` coefficients (fixed_mb: runtime, embeddings and activations; base_mb:
the prunable weights and what scales with them; lora_mb_per_rank) at the ratio it trains
at, which bounds a first pruning round too (scoring the unpruned base peaks lower: bench_client).

`arm_policy: random` replaces the bandit by a uniformly random feasible arm of the initial
grid (seeded by seed, round and client): the ablation the benchmark compares against.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import statistics
from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from strategies.bandit import Arm, BanditBank, ClientBandit, Feasible
from strategies.base import ClientIdentity
from strategies.devices import DeviceProfile
from strategies.flora import FLoRA
from strategies.lora_math import (
    Factors,
    LoraUpdate,
    append_factors,
    join_factors,
    rank_of,
    split_factors,
    truncate_factors,
)
from strategies.protocol import METRICS, NO_SETUP, UNITS, TrainOrder
from strategies.replies import RejectedReply, parse_reply
from strategies.scatter import Kept, pruned_shapes, read_kept, scatter_factors, slice_factors
from strategies.spine_config import (
    REWARD_FROM,
    bandit_config,
    check_options,
    memory_model,
    prune_template,
)
from strategies.spine_memory import needed_prune_ratio
from strategies.spine_prior import Seen, arm_prior, arm_seconds, first_prior, owed_seconds
from strategies.spine_reward import failed_reward, round_rewards
from strategies.summary import ClientOutcome
from strategies.units import UnitLists, read_units, units_record

TOLERANCE = 1e-9  # ratios are sums of floats
class FedSpine(FLoRA):
    name = "fedspine"
    supports_dp = False
    prunes = True
    picks_ranks = True  # each client's bandit picks its rank
    increments = False  # a client's slot is its upload scattered to full shape: send G cut
    cappable = False

    def __init__(self, *args, arm_policy: str = "bandit", time_weight: float = 1.0,
                 bandit: Mapping | None = None, prune: Mapping | None = None,
                 memory: Mapping | None = None, num_rounds: int = 1,
                 prune_at_end: bool = False, personal: bool = False,
                 reward_from: str = "start", reward_scale: str = "round", **kwargs) -> None:
        super().__init__(*args, ranks=None, **kwargs)  # the bandits pick every client's rank
        check_options(arm_policy, time_weight, num_rounds, prune_at_end, personal, reward_from,
                      reward_scale)
        self.before_key = REWARD_FROM[reward_from]  # the reward's L_before metric
        self.relative = reward_scale == "round"  # rewards / the round's median gain
        self.personal = personal  # each device keeps its own residual P_k beside G
        self.arm_policy, self.time_weight = arm_policy, float(time_weight)
        self.prune_at_end = prune_at_end  # federate, then prune in the last round
        self.final_round = num_rounds  # every device is at its target sparsity after it
        self.bank = BanditBank(bandit_config(bandit))
        self.check_ranks(self.bank.config.ranks, "strategy.bandit.ranks")
        self.prune = prune_template(prune)
        self.make_order(1, 1, prune=self.prune)  # slices within local_steps: fail now
        self.memory = memory_model(memory)
        self.arms: dict[str, tuple[Arm, ClientIdentity, TrainOrder]] = {}  # this round's
        self.units: dict[str, UnitLists] = {}  # per client name: the structure it reached
        self.reached: dict[str, float] = {}  # ... and its prune ratio
        self.device_class: dict[str, str] = {}  # ... and its device class
        self.kept: dict[str, Kept] = {}  # ... and its layers' kept rows / columns (downlink)
        self.pending: dict[int, tuple[UnitLists, Kept, LoraUpdate]] = {}  # id(order) -> reply's
        # what each device holds after its last accepted round: G of that round (full shape,
        # wire dtype; it was sent cut to the device's structure) + its own update beside it
        self.held: dict[str, Factors] = {}
        self.sent_global: Factors = {}
        self.residual: dict[str, Factors] = {}  # `personal`: P_k per device
        self.seen: dict[str, Seen] = {}  # per device: what its last accepted round cost
        self.targets = {d.name: self.target_for(d) for d in self.devices}  # fail now

    def need(self, device: DeviceProfile, rank: int) -> float:
        """The least prune ratio at which `rank` fits `device`'s memory budget."""
        return needed_prune_ratio(device.memory_mb, rank, self.memory["base_mb"],
                                  self.memory["lora_mb_per_rank"], self.memory["fixed_mb"])

    def target_for(self, device: DeviceProfile) -> float:
        """The device's final sparsity: its class's, else the least its budget needs (to
        0.01); ValueError when no arm of the grid fits its budget at that sparsity."""
        rank = min(self.bank.config.ranks)
        need = self.need(device, rank)
        limit = self.bank.config.max_prune_ratio
        where = f"scenario.devices.{device.name}"
        if device.sparsity is None:
            if need > limit:
                raise ValueError(f"{where}: memory_mb={device.memory_mb:g} fits no arm: even "
                                 f"pruned to max_prune_ratio={limit} at rank {rank} the "
                                 "estimated training memory exceeds it; allowed: a larger "
                                 "memory_mb or smaller strategy.memory coefficients")
            return math.ceil(round(need * 100, 6)) / 100
        if device.sparsity < need - TOLERANCE:
            raise ValueError(f"{where}.sparsity={device.sparsity:g} is infeasible: its "
                             f"memory_mb={device.memory_mb:g} needs at least "
                             f"{min(need, 1):.3f} at rank {rank}; allowed: a sparsity >= "
                             f"{math.ceil(round(need * 100, 6)) / 100:g} below 1, or a "
                             "larger memory_mb")
        return device.sparsity

    def train_ratio(self, server_round: int, client: ClientIdentity, arm: Arm) -> float:
        """The ratio `client` trains at this round with `arm` (module docstring)."""
        device = self.device_for(client)
        target = self.targets[device.name]
        if server_round >= self.final_round:
            return target
        if self.prune_at_end:
            return 0.0
        reached = self.reached.get(client.name, 0.0)
        return min(target, max(reached, arm.prune_ratio, self.need(device, arm.rank)))

    def feasible_for(self, client: ClientIdentity, arms: Iterable[Arm],
                     server_round: int = 0) -> Feasible:
        """Arms of `arms` whose rank fits the device at a ratio it may train at (up to its
        target; 0 before the last round with `prune_at_end`), and of arms that train alike
        there (the same rank, the same ratio once raised to what the rank needs and to what
        the device reached, capped at that limit) only the first in grid order: the edge of
        a run whose target is 0, or a device at its target, has as many arms as ranks, not
        ratios × ranks."""
        device = self.device_for(client)
        limit = self.targets[device.name]
        if self.prune_at_end and server_round < self.final_round:
            limit = 0.0
        reached = self.reached.get(client.name, 0.0)
        first: dict[tuple[float, int], Arm] = {}
        for arm in arms:
            need = self.need(device, arm.rank)
            if need <= limit + TOLERANCE:
                ratio = min(limit, max(reached, arm.prune_ratio, need))
                alike = (round(ratio, 6), arm.rank)
                first.setdefault(alike, arm)
        return set(first.values()).__contains__

    def prior_for(self, server_round: int, client: ClientIdentity) -> Callable[[Arm], float]:
        """`client`'s unplayed arms' predicted reward (`strategies.spine_prior`)."""
        bandit, seen = self.bank[client.name], self.seen.get(client.name)
        means = {a: s.mean for a, s in bandit.stats.items() if s.pulls}
        device, share = self.device_for(client), bandit.config.fixed_step_share
        ratio = functools.partial(self.train_ratio, server_round, client)
        target, feasible = self.targets[device.name], self.feasible_for(client, bandit.arms,
                                                                        server_round)
        reachable = any(feasible(a) and ratio(a) >= target - TOLERANCE for a in bandit.arms)
        short = lambda arm: reachable and ratio(arm) < target - TOLERANCE
        if not (seen and means):
            return first_prior(short, self.time_weight)
        seconds = lambda arm, rank: arm_seconds(seen, device, ratio(arm), rank, share)
        return arm_prior(means, seconds, self.time_weight, owed_seconds(short, seen.median_seconds))

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """With `prune_at_end`, a device that cannot train the unpruned model (its memory
        needs pruning at every rank of the grid) sits out until the last round."""
        nodes = super().sample(grid, server_round)
        if not self.prune_at_end or server_round >= self.final_round:
            return nodes
        rank = min(self.bank.config.ranks)
        return [n for n in nodes
                if self.need(self.device_for(self.identities[n]), rank) <= TOLERANCE]

    def choose_arm(self, server_round: int, client: ClientIdentity) -> Arm:
        if self.arm_policy == "random":  # the initial grid, never refined
            grid = ClientBandit(self.bank.config).arms
            feasible = self.feasible_for(client, grid, server_round)
            rng = random.Random(f"{self.seed}/{server_round}/{client.name}")
            return rng.choice([a for a in grid if feasible(a)])
        bandit = self.bank[client.name]
        return bandit.select(self.feasible_for(client, bandit.arms, server_round),
                             self.prior_for(server_round, client))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.arms, self.pending = {}, {}
        wire = getattr(torch, self.setup.wire_dtype)
        self.sent_global = {m: (a.to(wire), b.to(wire)) for m, (a, b) in
                            self.global_factors.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def order_for(self, server_round: int, client: ClientIdentity) -> TrainOrder:
        arm = self.choose_arm(server_round, client)
        ratio = self.train_ratio(server_round, client, arm)
        order = self.make_order(server_round, arm.rank, prune=dataclasses.replace(
            self.prune, ratio=ratio, reached=min(ratio, self.reached.get(client.name, 0.0)),
            target=self.targets[self.device_for(client).name]))
        self.arms[client.name] = (arm, client, order)
        return order

    def client_state(self, client: ClientIdentity,
                     state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """G (+ its residual P_k beside it, with `personal`), cut to the rows / columns the
        device's layers kept (the device would only slice the rest off; `slice_global`)."""
        factors = split_factors(state)
        if self.personal and client.name in self.residual:
            factors = append_factors(factors, self.residual[client.name])
        return join_factors(slice_factors(factors, self.kept.get(client.name, {})))

    def keep_residual(self, name: str, update: LoraUpdate, share: float) -> None:
        """P_k ← P_k + (1 − p_k) s U, re-compressed to `rank_budget` (G holds p_k s U)."""
        own = {m: ((1 - share) * update.scaling * a, b) for m, (a, b) in update.factors.items()}
        joined = append_factors(self.residual.get(name, {}), own)
        self.residual[name] = truncate_factors(joined, self.rank_budget)[0] \
            if rank_of(joined) > self.rank_budget else joined

    def order_records(self, client: ClientIdentity) -> dict[str, ArrayRecord]:
        units = self.units.get(client.name)
        return {UNITS: units_record(units)} if units else {}

    def parse_update(self, content: RecordDict, order: TrainOrder) -> LoraUpdate:
        """Check a pruned reply against its kept indices and its device's structure, then
        scatter it to full shape."""
        kept = read_kept(content, self.module_shapes)
        update = parse_reply(content, pruned_shapes(self.module_shapes, kept), order.lora_r,
                             order.scaling)
        metrics = content.metric_records[METRICS]  # parse_reply checked train-seconds
        if "train-seconds" not in metrics:
            raise RejectedReply("metric 'train-seconds' is missing; the reward needs it")
        for key in (self.before_key, "loss-after"):
            value = metrics.get(key)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise RejectedReply(f"metric '{key}' is {value!r}; expected a finite loss")
        name = next((n for n, (_, _, o) in self.arms.items() if o is order), None)
        units = read_units(content, self.units.get(name, {}))
        try:
            factors = scatter_factors(update.factors, kept, self.module_shapes)
        except ValueError as err:
            raise RejectedReply(str(err)) from None
        scattered = LoraUpdate(factors, update.scaling, update.weight)
        self.pending[id(order)] = (units, kept, scattered)
        return scattered

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.learn(server_round, self.round_log[server_round].clients)
        return arrays, metrics

    def learn(self, server_round: int, clients: dict[str, ClientOutcome]) -> None:
        """Keep each accepted device's structure, reward each of this round's arms, update
        the bandits, log arm / ratio / reward / time.

        A client that only lost its run setup (protocol.NO_SETUP: a restarted SuperNode)
        says nothing about its arm: its bandit is not updated."""
        ok = {n: c for n, c in clients.items() if n in self.arms and c.ok}
        times = [c.completion_seconds or 0.0 for c in ok.values()]
        rewards = round_rewards({n: (c.metrics[self.before_key], c.metrics["loss-after"],
                                     c.completion_seconds or 0.0) for n, c in ok.items()},
                                self.time_weight, self.relative)
        total = sum(self.pending[id(self.arms[n][2])][2].weight for n in ok) or 1.0
        for name, (arm, client, order) in sorted(self.arms.items()):
            outcome = clients.setdefault(name, ClientOutcome())
            value = rewards.get(name, failed_reward(self.time_weight, self.relative))
            if name in ok:
                self.units[name], self.kept[name], update = self.pending[id(order)]
                wire = getattr(torch, self.setup.wire_dtype)
                sent = append_factors(self.sent_global, self.residual.get(name, {})) \
                    if self.personal else self.sent_global
                self.held[name] = append_factors(sent, {
                    m: ((update.scaling * a).to(wire), b.to(wire))
                    for m, (a, b) in update.factors.items()})
                if self.personal:
                    self.keep_residual(name, update, update.weight / total)
                self.reached[name] = order.prune.ratio if order.prune else 0.0
                self.seen[name] = Seen(
                    outcome.metrics["train-seconds"], self.reached[name],
                    outcome.bytes_up or 0, arm.rank, outcome.bytes_down,
                    statistics.median(times))
                self.device_class[name] = self.device_for(client).name
            lost_setup = NO_SETUP in outcome.status
            outcome.extra.update({"arm-prune-ratio": arm.prune_ratio, "arm-rank": arm.rank,
                                  "train-ratio": order.prune.ratio if order.prune else 0.0,
                                  **({} if lost_setup else {"reward": value})})
            added = []
            if self.arm_policy == "bandit" and not lost_setup:
                bandit = self.bank[name]
                bandit.update(arm, value)
                added = bandit.refine(self.feasible_for(client, bandit.arms))
            log(INFO, "  %s: arm (prune %.3f, r=%d) -> ratio %.3f of target %.3f, reward "
                "%+.4f, completion %s s%s", name, arm.prune_ratio, arm.rank,
                order.prune.ratio if order.prune else 0.0,
                self.targets[self.device_for(client).name], value,
                f"{outcome.completion_seconds:.1f}" if name in ok else "-",
                f", grid refined with {[(a.prune_ratio, a.rank) for a in added]}" if added
                else ", not learned: it lost its run setup" if lost_setup else "")

    def deployments(self) -> dict[str, dict]:
        """Per device that trained: its class, target and reached sparsity, structure, and
        the adapter it holds (`held`: G of its last round, full shape in the wire dtype, + its
        own update, the model it ended that round with; absent from an older checkpoint: G).
        Its deployed model is the base pruned to `units` with that adapter cut to it."""
        out = {}
        for name, device in sorted(self.device_class.items()):
            out[name] = {"device": device, "target": self.targets[device],
                         "reached": self.reached[name], "units": self.units.get(name, {})}
            if self.personal and name in self.residual:  # G + P_k, as it would get next
                out[name]["held"] = join_factors(append_factors(self.global_factors,
                                                                self.residual[name]))
            elif name in self.held:
                out[name]["held"] = join_factors(self.held[name])
        return out

    def state_dict(self) -> dict:
        """Bandits, structures, and the adapters each device holds: a discarded attempt
        restores them all (factors are never changed in place, so copies of the dicts do)."""
        return {**super().state_dict(), "bandits": self.bank.state_dict(),
                "units": {n: {k: list(v) for k, v in u.items()} for n, u in self.units.items()},
                "reached": dict(self.reached), "device_class": dict(self.device_class),
                "kept": dict(self.kept), "held": {n: dict(f) for n, f in self.held.items()},
                "residual": {n: dict(f) for n, f in self.residual.items()},
                "sent_global": dict(self.sent_global),
                "seen": {n: dataclasses.asdict(v) for n, v in self.seen.items()}}

    def load_state(self, state: dict, arrays: ArrayRecord) -> None:
        super().load_state(state, arrays)
        if state.get("bandits"):
            self.bank = BanditBank.from_state_dict(state["bandits"])
        self.units = {n: {k: list(v) for k, v in u.items()}
                      for n, u in state.get("units", {}).items()}
        self.reached = {n: float(r) for n, r in state.get("reached", {}).items()}
        self.device_class = dict(state.get("device_class", {}))
        self.kept = dict(state.get("kept", {}))  # absent from an older checkpoint: send all of G
        self.held = {n: dict(f) for n, f in state.get("held", {}).items()}
        self.residual = {n: dict(f) for n, f in state.get("residual", {}).items()}
        self.sent_global = dict(state.get("sent_global", {}))
        self.seen = {n: Seen(**v) for n, v in state.get("seen", {}).items()}

    def export_metadata(self) -> dict:
        meta = {**super().export_metadata(), "targets": self.targets,
                "reached": self.reached}
        if self.arm_policy != "bandit":  # random arms: the bandits learned nothing
            return {**meta, "arm_policy": self.arm_policy}
        return {**meta, "bandits": self.bank.state_dict()}

    def summary(self) -> None:
        log(INFO, "\t├──> fedspine: %s arms over ratios %s x ranks %s, λ=%g, prune %s, "
            "target sparsity %s by round %d", self.arm_policy,
            list(self.bank.config.prune_ratios), list(self.bank.config.ranks),
            self.time_weight, self.prune.to_dict(), self.targets, self.final_round)
        super().summary()
