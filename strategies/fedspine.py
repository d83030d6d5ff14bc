"""FedSpine (Yao et al., 2025): a bandit per client picks its prune ratio and LoRA rank.

Every round, for each selected client, its bandit (`strategies.bandit`, keyed by the
client's stable name) picks an arm (prune ratio, rank) among those its device's memory
budget allows; the client prunes a fresh copy of the base to that ratio, tunes a LoRA of that
rank beside the frozen global update G (the client round of `fedapp.client`; a configuration
pruned before is reused from the client process's cache), and replies with its factors at
the pruned shapes plus the rows / columns it kept. The server scatters them back to full
shape (zeros at pruned units, `strategies.scatter`) and FLoRA-stacks them into G, which
stays unpruned. Then each bandit learns its arm's reward (`bandit.reward`):

    reward_k = clip((L_before − L_after) / L_before, −1, 1) − λ · (T_k / median_j T_j − 1)

with L the client's loss on its own probe batch: L_before of the model the server sent
(unpruned base + G), L_after of its pruned, tuned model, so pruning damage is charged; T its
completion time (`completion-seconds`: compute × its device's slow-down + bytes over its
links), λ = `time_weight`. A selected client that sends no valid reply earns −1 − λ, as bad
as the worst loss change at twice the median time.

The memory a client would need for an arm is `bandit.estimated_memory_mb` with this
strategy's `memory` coefficients (fixed_mb: runtime, embeddings and activations; base_mb:
the prunable attention / MLP weights and what scales with them; lora_mb_per_rank); arms
above the device's `memory_mb` are never played.

`arm_policy: random` replaces the bandit by a uniformly random feasible arm of the initial
grid (seeded by seed, round and client): the ablation the benchmark compares against.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Mapping
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from strategies.bandit import (
    Arm,
    BanditBank,
    BanditConfig,
    ClientBandit,
    Feasible,
    memory_feasible,
    reward,
)
from strategies.base import ClientIdentity
from strategies.flora import FLoRA
from strategies.lora_math import LoraUpdate
from strategies.protocol import (
    KEPT,
    KEPT_IN,
    KEPT_OUT,
    METRICS,
    NO_SETUP,
    PruneOrder,
    TrainOrder,
)
from strategies.replies import RejectedReply, parse_reply
from strategies.scatter import Kept, scatter_factors
from strategies.summary import ClientOutcome

POLICIES = ("bandit", "random")
PRUNE_KEYS = ("criterion", "slices", "tune_steps")
MEMORY_KEYS = ("fixed_mb", "base_mb", "lora_mb_per_rank")


def bandit_config(bandit: Mapping | None) -> BanditConfig:
    """`strategy.bandit` as a BanditConfig (which checks the values), unknown keys refused."""
    bandit = dict(bandit or {})
    allowed = [f.name for f in dataclasses.fields(BanditConfig)]
    if unknown := sorted(set(bandit) - set(allowed)):
        raise ValueError(f"strategy.bandit has unknown keys {unknown}; allowed: {allowed}")
    try:
        return BanditConfig.from_dict(bandit)
    except ValueError as err:
        raise ValueError(f"strategy.{err}") from None


def prune_template(prune: Mapping | None) -> PruneOrder:
    """`strategy.prune` as the PruneOrder every client gets (its ratio set per arm)."""
    prune = dict(prune or {})
    if unknown := sorted(set(prune) - set(PRUNE_KEYS)):
        raise ValueError(f"strategy.prune has unknown keys {unknown}; allowed: "
                         f"{list(PRUNE_KEYS)}")
    return PruneOrder(ratio=0.0, **prune)


def memory_model(memory: Mapping | None) -> dict[str, float]:
    """`strategy.memory`: the coefficients of an arm's estimated memory (all three, >= 0)."""
    memory = dict(memory or {k: 0.0 for k in MEMORY_KEYS})
    if sorted(memory) != sorted(MEMORY_KEYS) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
            for v in memory.values()):
        raise ValueError(f"strategy.memory={memory}; allowed: numbers >= 0 for exactly "
                         f"{list(MEMORY_KEYS)}")
    return {k: float(v) for k, v in memory.items()}


def read_kept(content: RecordDict, module_shapes: Mapping[str, tuple[int, int]]) -> Kept:
    """The reply's kept rows / columns per module ({} when it pruned nothing)."""
    if KEPT not in content.array_records:
        return {}
    arrays = content.array_records[KEPT].to_torch_state_dict()
    kept: dict = {}
    for key, index in arrays.items():
        suffix = KEPT_OUT if key.endswith(KEPT_OUT) else KEPT_IN if key.endswith(KEPT_IN) \
            else None
        module = key.removesuffix(suffix) if suffix else key
        if suffix is None or module not in module_shapes:
            raise RejectedReply(f"kept record holds '{key}'; allowed: '<target module>"
                                f"{KEPT_OUT}' and '<target module>{KEPT_IN}'")
        kept.setdefault(module, {})[suffix] = index
    if half := sorted(m for m, sides in kept.items() if len(sides) != 2):
        raise RejectedReply(f"kept record has only one side for {half[:2]}; both "
                            f"{KEPT_OUT} and {KEPT_IN} are needed")
    return {m: (sides[KEPT_OUT], sides[KEPT_IN]) for m, sides in kept.items()}


def pruned_shapes(module_shapes: Mapping[str, tuple[int, int]],
                  kept: Kept) -> dict[str, tuple[int, int]]:
    """Shapes of the client's layers: kept counts where pruned; dropped modules left out."""
    shapes = {}
    for module, (n_out, n_in) in module_shapes.items():
        rows, cols = kept.get(module, (None, None))
        n_out = n_out if rows is None else rows.numel()
        n_in = n_in if cols is None else cols.numel()
        if n_out and n_in:
            shapes[module] = (n_out, n_in)
    return shapes


class FedSpine(FLoRA):
    name = "fedspine"
    supports_dp = False
    prunes = True
    picks_ranks = True  # each client's bandit picks its rank
    increments = False  # a client's slot is its upload scattered to full shape: send all of G

    def __init__(self, *args, arm_policy: str = "bandit", time_weight: float = 0.1,
                 bandit: Mapping | None = None, prune: Mapping | None = None,
                 memory: Mapping | None = None, **kwargs) -> None:
        super().__init__(*args, ranks=None, **kwargs)  # the bandits pick every client's rank
        if arm_policy not in POLICIES:
            raise ValueError(f"strategy.arm_policy={arm_policy!r}; allowed: {list(POLICIES)}")
        if isinstance(time_weight, bool) or not (isinstance(time_weight, int | float)
                                                 and math.isfinite(time_weight)
                                                 and time_weight >= 0):
            raise ValueError(f"strategy.time_weight={time_weight!r}; allowed: a number >= 0")
        self.arm_policy, self.time_weight = arm_policy, float(time_weight)
        self.bank = BanditBank(bandit_config(bandit))
        self.prune = prune_template(prune)
        self.make_order(1, 1, prune=self.prune)  # slices within local_steps: fail now
        self.memory = memory_model(memory)
        self.arms: dict[str, tuple[Arm, ClientIdentity]] = {}  # this round's, by client name
        for device in {d.name: d for d in self.devices}.values():  # fail before training
            ClientBandit(self.bank.config).select(1, self.feasible_for(device.memory_mb))

    def feasible_for(self, budget_mb: float) -> Feasible:
        return memory_feasible(budget_mb, self.memory["base_mb"],
                               self.memory["lora_mb_per_rank"], self.memory["fixed_mb"])

    def choose_arm(self, server_round: int, client: ClientIdentity) -> Arm:
        feasible = self.feasible_for(self.device_for(client).memory_mb)
        if self.arm_policy == "random":  # the initial grid, never refined
            allowed = [a for a in ClientBandit(self.bank.config).arms if feasible(a)]
            rng = random.Random(f"{self.seed}/{server_round}/{client.name}")
            return rng.choice(allowed)
        return self.bank[client.name].select(server_round, feasible)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.arms = {}
        return super().configure_train(server_round, arrays, config, grid)

    def order_for(self, server_round: int, client: ClientIdentity) -> TrainOrder:
        arm = self.choose_arm(server_round, client)
        self.arms[client.name] = (arm, client)
        return self.make_order(server_round, arm.rank,
                               prune=dataclasses.replace(self.prune, ratio=arm.prune_ratio))

    def parse_update(self, content: RecordDict, order: TrainOrder) -> LoraUpdate:
        """Check a pruned reply against its kept indices, then scatter it to full shape."""
        kept = read_kept(content, self.module_shapes)
        update = parse_reply(content, pruned_shapes(self.module_shapes, kept), order.lora_r,
                             order.scaling)
        metrics = content.metric_records[METRICS]  # parse_reply checked train-seconds
        if "train-seconds" not in metrics:
            raise RejectedReply("metric 'train-seconds' is missing; the reward needs it")
        for key in ("loss-before", "loss-after"):
            value = metrics.get(key)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise RejectedReply(f"metric '{key}' is {value!r}; expected a finite loss")
        try:
            factors = scatter_factors(update.factors, kept, self.module_shapes)
        except ValueError as err:
            raise RejectedReply(str(err)) from None
        return LoraUpdate(factors, update.scaling, update.weight)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.learn(server_round, self.round_log[server_round].clients)
        return arrays, metrics

    def learn(self, server_round: int, clients: dict[str, ClientOutcome]) -> None:
        """Reward each of this round's arms, update the bandits, log arm / reward / time.

        A client that only lost its run setup (protocol.NO_SETUP: a restarted SuperNode)
        says nothing about its arm: its bandit is not updated."""
        ok = {n: c for n, c in clients.items() if n in self.arms and c.ok}
        times = [c.completion_seconds or 0.0 for c in ok.values()]
        for name, (arm, client) in sorted(self.arms.items()):
            outcome = clients.setdefault(name, ClientOutcome())
            value = -1.0 - self.time_weight
            if name in ok:
                value = reward(outcome.metrics["loss-before"], outcome.metrics["loss-after"],
                               outcome.completion_seconds or 0.0, times, self.time_weight)
            lost_setup = NO_SETUP in outcome.status
            outcome.extra.update({"arm-prune-ratio": arm.prune_ratio, "arm-rank": arm.rank,
                                  **({} if lost_setup else {"reward": value})})
            added = []
            if self.arm_policy == "bandit" and not lost_setup:
                bandit = self.bank[name]
                bandit.update(arm, value)
                added = bandit.refine(self.feasible_for(self.device_for(client).memory_mb))
            log(INFO, "  %s: arm (prune %.3f, r=%d), reward %+.4f, completion %s s%s", name,
                arm.prune_ratio, arm.rank, value,
                f"{outcome.completion_seconds:.1f}" if name in ok else "-",
                f", grid refined with {[(a.prune_ratio, a.rank) for a in added]}" if added
                else ", not learned: it lost its run setup" if lost_setup else "")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bandits": self.bank.state_dict()}

    def load_state(self, state: dict, arrays: ArrayRecord) -> None:
        super().load_state(state, arrays)
        if state.get("bandits"):
            self.bank = BanditBank.from_state_dict(state["bandits"])

    def export_metadata(self) -> dict:
        if self.arm_policy != "bandit":  # random arms: the bandits learned nothing
            return {**super().export_metadata(), "arm_policy": self.arm_policy}
        return {**super().export_metadata(), "bandits": self.bank.state_dict()}

    def summary(self) -> None:
        log(INFO, "\t├──> fedspine: %s arms over ratios %s x ranks %s, λ=%g, prune %s",
            self.arm_policy, list(self.bank.config.prune_ratios),
            list(self.bank.config.ranks), self.time_weight, self.prune.to_dict())
        super().summary()
