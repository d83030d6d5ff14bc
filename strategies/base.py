"""What every LoRA strategy here shares: who the clients are, what each is told, what is
accepted back, and a per-round log of bytes and losses.

Subclasses set `global_mode`, override `client_state` / `order_for` / `downlink` where a
client receives something particular, and `aggregate_updates` (the math, delegated to pure
functions in `lora_math`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.devices import DeviceProfile
from strategies.lora_math import LoraUpdate
from strategies.messaging import send_and_receive
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    GLOBAL,
    IDENTITY,
    METRICS,
    NO_GLOBAL,
    NO_SETUP,
    SETUP,
    RunSetup,
    TrainOrder,
    alpha_for,
)
from strategies.replies import RejectedReply, parse_reply
from strategies.summary import OK, ClientOutcome, RoundSummary


@dataclass(frozen=True)
class ClientIdentity:
    """A client as the strategy knows it: stable across restarts, unlike a node id."""

    name: str
    partition_id: int


@dataclass
class Assignment:
    client: ClientIdentity
    order: TrainOrder
    bytes_down: int  # all of the train message, the run setup included when it carries it
    setup_bytes: int = 0  # the run setup's share: traffic, but no part of this round's work


def config_bytes(record: ConfigRecord) -> int:
    """Approximate wire size of a ConfigRecord (flwr's own count_bytes fails on "")."""
    return len(json.dumps(dict(record.items())))


class LoraStrategy(FedAvg):
    """FedAvg's sampling and message plumbing, with per-client LoRA orders and checked replies.

    Args:
        setup: what every client needs for the whole run; sent once per client, in the
            first train message it gets (again if it answers that it lost it).
        module_shapes: {peft module key: (out, in)} of the targeted layers, to check replies.
        local_steps: optimizer steps per client and round.
        ranks: LoRA rank per client, cycled over partition ids (one entry: homogeneous);
            None for a strategy that picks ranks itself (FedSpine's bandits).
        alpha_ratio: lora_alpha = alpha_for(r, alpha_ratio) for each client.
        seed: seeds client sampling and each round's client seeds.
        wait_seconds: how long to wait for `min_available_nodes` before giving up.
        devices: device profile per partition id (cycled): an accepted client's completion
            time (`completion-seconds`) follows it; None: compute + transfer at 20/100 Mbit/s.
    """

    name = "lora"
    global_mode = "none"  # how clients use the global arrays: see protocol.GLOBAL_MODES
    picks_ranks = False  # True: the strategy picks each client's rank (FedSpine): no `ranks`
    supports_dp = False  # True: accepts a `dp` config (client-level DP, strategies.dp)
    emulates = False  # True: clients run an emulator the ServerApp prepares (FedBiOT)
    prunes = False  # True: clients prune the base structurally (FedSpine): the model must allow it

    def __init__(self, setup: RunSetup, module_shapes: Mapping[str, tuple[int, int]], *,
                 local_steps: int, ranks: Sequence[int] | None, alpha_ratio: float,
                 seed: int = 0, fraction_train: float = 1.0, min_train_nodes: int = 2,
                 min_available_nodes: int = 2, wait_seconds: float = 300.0,
                 devices: list[DeviceProfile] | None = None) -> None:
        if not 0 < fraction_train <= 1:
            raise ValueError(f"scenario.fraction_train={fraction_train}; allowed: 0 < x <= 1")
        super().__init__(fraction_train=fraction_train,
                         min_train_nodes=min_train_nodes, min_available_nodes=min_available_nodes)
        # No federated evaluation, by design: the server evaluates the global adapter on the
        # held-out split itself. Set after FedAvg's init, whose warning says only that.
        self.fraction_evaluate = 0.0
        if (ranks is None) != self.picks_ranks or (ranks is not None and not ranks):
            raise ValueError(f"strategy.ranks={ranks!r}; allowed: " + (
                "none: this strategy picks each client's rank" if self.picks_ranks
                else "a non-empty list of positive integers"))
        if isinstance(alpha_ratio, bool) or not isinstance(alpha_ratio, int | float) \
                or not alpha_ratio > 0:
            raise ValueError(f"lora.alpha_ratio={alpha_ratio!r}; allowed: a number > 0")
        self.setup = setup
        self.module_shapes = dict(module_shapes)
        self.check_ranks(ranks or [], "strategy.ranks")
        self.local_steps = local_steps
        self.ranks = list(ranks) if ranks is not None else None
        self.alpha_ratio = alpha_ratio
        self.seed = seed
        self.wait_seconds = wait_seconds
        self.devices = list(devices) if devices else [DeviceProfile("default")]
        self.identities: dict[int, ClientIdentity] = {}
        self.federation_met = False  # the whole federation has been waited for once
        self.setup_owed: set[int] = set()  # nodes whose next train message carries the setup
        self.assignments: dict[int, Assignment] = {}
        self.round_log: dict[int, RoundSummary] = {}
        self.sent: list[Message] = []
        for r in self.ranks or [1]:  # TrainOrder checks the configured values: fail now
            TrainOrder(server_round=1, lora_r=r, lora_alpha=alpha_for(r, alpha_ratio),
                       local_steps=local_steps, seed=seed)

    def check_ranks(self, ranks: Sequence[int], key: str) -> None:
        """A rank beyond min(out, in) of every target module buys nothing (B @ A cannot
        exceed it) and costs more than training the modules themselves."""
        limit = max((min(shape) for shape in self.module_shapes.values()), default=0)
        if limit and ranks and max(ranks) > limit:
            raise ValueError(f"{key}={list(ranks)}: rank {max(ranks)} exceeds {limit}, the "
                             f"largest rank any target module has; allowed: ranks <= {limit}")

    # ------------------------------------------------------------------ who the clients are
    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Connected node ids; a clear error if too few come within `wait_seconds`.

        The first round waits for the whole federation (`min_available_nodes`); later rounds
        go on with whoever is online as long as `min_train_nodes` are, so a node that died
        does not stop the run."""
        needed, key = self.min_available_nodes, "scenario.num_clients"
        if self.federation_met:
            needed, key = self.min_train_nodes, "scenario.min_train_nodes"
        deadline = time.monotonic() + self.wait_seconds
        while len(nodes := sorted(grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} client node(s) connected after {self.wait_seconds:.0f} s; "
                    f"{key} asks for at least {needed}"
                )
            time.sleep(1)
        return nodes

    def identify(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Ask nodes we have not met yet for their partition id and name (a query message);
        each newly met node is owed the run's setup."""
        unknown = [n for n in node_ids if n not in self.identities]
        if not unknown:
            return
        asks = [Message(RecordDict({CONFIG: ConfigRecord({"ask": "identity"})}),
                        message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        for reply in send_and_receive(grid, asks, self.wait_seconds):
            if reply.has_error() or IDENTITY not in reply.content.config_records:
                log(WARNING, "A node did not identify itself: %s",
                    reply.error.reason if reply.has_error() else "no identity record")
                continue
            ident = reply.content.config_records[IDENTITY]
            node_id = reply.metadata.src_node_id
            self.identities[node_id] = ClientIdentity(name=str(ident["client-name"]),
                                                      partition_id=int(ident["partition-id"]))
            self.setup_owed.add(node_id)

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        nodes = self.wait_for_nodes(grid)
        self.federation_met = True
        self.identify(grid, nodes)
        nodes = [n for n in nodes if n in self.identities]
        rng = random.Random(self.seed * 100_003 + server_round)
        return sorted(rng.sample(nodes, self.sample_size(len(nodes))))

    def sample_size(self, available: int) -> int:
        """How many of `available` identified nodes train this round."""
        return min(available, max(int(available * self.fraction_train), self.min_train_nodes))

    # ------------------------------------------------------------------ what each is told
    def rank_for(self, client: ClientIdentity) -> int:
        if self.ranks is None:
            raise NotImplementedError(f"{self.name} picks each client's rank itself")
        return self.ranks[client.partition_id % len(self.ranks)]

    def device_for(self, client: ClientIdentity) -> DeviceProfile:
        return self.devices[client.partition_id % len(self.devices)]

    def order_steps(self) -> int:
        """Optimizer steps a client trains per order (one-shot: its whole budget)."""
        return self.local_steps

    def make_order(self, server_round: int, r: int, **fields: object) -> TrainOrder:
        """A rank-r order of this strategy for `server_round` (validated by TrainOrder)."""
        return TrainOrder(server_round=server_round, lora_r=r,
                          lora_alpha=alpha_for(r, self.alpha_ratio),
                          local_steps=self.order_steps(),
                          seed=self.seed * 1000 + server_round, global_mode=self.global_mode,
                          **fields)  # type: ignore[arg-type]

    def client_scaling(self, client: ClientIdentity) -> float:
        """peft's scaling (lora_alpha / r) of the LoRA this client trains."""
        r = self.rank_for(client)
        return alpha_for(r, self.alpha_ratio) / r

    def order_for(self, server_round: int, client: ClientIdentity) -> TrainOrder:
        """What `client` trains this round; subclasses change the rank, steps or pruning."""
        return self.make_order(server_round, self.rank_for(client))

    def client_state(self, client: ClientIdentity,
                     state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What of the (non-empty) global state this client needs; default: all of it."""
        return state

    def client_arrays(self, client: ClientIdentity,
                      state: dict[str, torch.Tensor]) -> ArrayRecord:
        """`client_state` of the global state, in the wire dtype."""
        if not state:
            return ArrayRecord()
        dtype = getattr(torch, self.setup.wire_dtype)
        return ArrayRecord({k: v.to(dtype) for k, v in self.client_state(client, state).items()})

    def downlink(self, server_round: int, client: ClientIdentity, state: dict[str, torch.Tensor],
                 order: TrainOrder) -> tuple[ArrayRecord, ConfigRecord | None]:
        """The train message's arrays for `client` (beside its `order`), and the record that
        says how to read them (None: use them as sent; FLoRA sends versions, increments)."""
        return self.client_arrays(client, state), None

    def order_records(self, client: ClientIdentity) -> dict[str, ArrayRecord]:
        """Further records of `client`'s train message (FedSpine: its pruned structure)."""
        return {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = self.sample(grid, server_round)
        state = arrays.to_torch_state_dict()  # once per round, not once per client
        self.assignments = {}
        messages = []
        for node_id in node_ids:
            client = self.identities[node_id]
            order = self.order_for(server_round, client)
            payload, version = self.downlink(server_round, client, state, order)
            content = RecordDict({ARRAYS: payload, CONFIG: order.to_config()})
            if version is not None:
                content[GLOBAL] = version
            extra = self.order_records(client)
            for record_name, record in extra.items():
                content[record_name] = record
            setup_bytes = 0
            if node_id in self.setup_owed:  # once per client: it keeps it in context.state
                content[SETUP] = self.setup.to_config()
                setup_bytes = config_bytes(content[SETUP])
                self.setup_owed.discard(node_id)
            self.assignments[node_id] = Assignment(
                client, order, payload.count_bytes() + config_bytes(content[CONFIG])
                + sum(r.count_bytes() for r in extra.values())
                + (config_bytes(version) if version is not None else 0) + setup_bytes,
                setup_bytes)
            messages.append(Message(content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
        chosen = ", ".join(f"{a.client.name}(r={a.order.lora_r})"
                           for a in self.assignments.values())
        self.sent = messages  # their message ids are filled in when the grid pushes them
        log(INFO, "configure_train: round %d, %d of %d clients: %s", server_round,
            len(node_ids), len(self.identities), chosen)
        return messages

    # ------------------------------------------------------------------ what comes back
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        summary = RoundSummary(server_round)
        updates: list[LoraUpdate] = []
        losses: list[tuple[float, float]] = []  # (weight, train loss) of accepted replies
        # An error reply made by the SuperLink (e.g. for a vanished node) comes from node 1:
        # find who it stands for through the message it answers.
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent
                if m.metadata.message_id}
        accepted = []  # sorted by name below: the aggregate must not depend on arrival order
        for msg in replies:
            node_id = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            name, outcome, update = self.check_reply(server_round, node_id, msg)
            summary.clients[name] = outcome
            if update is not None:
                accepted.append((name, update, outcome.metrics.get("train-loss", float("nan"))))
        for _, update, loss in sorted(accepted, key=lambda item: item[0]):
            updates.append(update)
            losses.append((update.weight, loss))
        for assignment in self.assignments.values():  # asked but never answered
            summary.clients.setdefault(assignment.client.name,
                                       ClientOutcome(bytes_down=assignment.bytes_down))
        asked = {a.client.name: a.order for a in self.assignments.values()}
        for name, c in sorted(summary.clients.items()):
            order = asked.get(name)
            log(INFO, "  %s", c.console_line(name, order.lora_r if order else None,
                                             order.local_steps if order else None))
        self.round_log[server_round] = summary
        if not updates:
            log(WARNING, "Round %d: no valid reply; the global adapter is unchanged", server_round)
            return None, None
        total = sum(w for w, _ in losses)
        summary.train_loss = sum(w * loss for w, loss in losses) / total
        arrays, summary.figures = self.aggregate_updates(server_round, updates)
        return arrays, MetricRecord({"train-loss": summary.train_loss,
                                     "num-examples": float(total), **summary.figures})

    def check_reply(self, server_round: int, node_id: int, msg: Message
                    ) -> tuple[str, ClientOutcome, LoraUpdate | None]:
        """(client name, its outcome, its update if the reply is accepted)."""
        assignment = self.assignments.get(node_id)
        name = assignment.client.name if assignment else f"node-{node_id}"
        outcome = ClientOutcome(bytes_down=assignment.bytes_down if assignment else 0)
        try:
            if msg.has_error():
                if NO_SETUP in msg.error.reason:  # e.g. a restarted SuperNode: send it again
                    self.setup_owed.add(node_id)
                if NO_GLOBAL in msg.error.reason:  # not accepted: next time the whole global
                    log(INFO, "%s lost its copy of the global: it gets all of it next time",
                        name)
                raise RejectedReply(f"client error: {msg.error.reason}")
            if assignment is None:
                raise RejectedReply("reply from a node that was not asked")
            outcome.bytes_up = sum(r.count_bytes() for r in msg.content.array_records.values())
            try:
                update = self.parse_update(msg.content, assignment.order)
            except RejectedReply:
                raise
            except Exception as err:  # a reply is untrusted input: no fault in one may stop
                # the round; the checks in parse_update name the faults they know
                raise RejectedReply(f"malformed reply ({type(err).__name__}: "
                                    f"{str(err)[:200]})") from err
        except RejectedReply as err:
            log(WARNING, "Round %d: rejected %s: %s", server_round, name, err)
            outcome.status = f"rejected: {err}"
            return name, outcome, None
        metrics = msg.content.metric_records[METRICS]
        outcome.status, outcome.r = OK, assignment.order.lora_r
        outcome.metrics = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
        device = self.device_for(assignment.client)
        outcome.device = device.name
        outcome.completion_seconds = device.completion_seconds(  # the round's own work
            outcome.metrics.get("train-seconds", 0.0), outcome.bytes_up,
            outcome.bytes_down - assignment.setup_bytes)
        return name, outcome, update

    def parse_update(self, content: RecordDict, order: TrainOrder) -> LoraUpdate:
        """Check one reply against its order (raises RejectedReply)."""
        return parse_reply(content, self.module_shapes, order.lora_r, order.scaling)

    def state_dict(self) -> dict:
        """What a checkpoint must keep beyond the global arrays (e.g. bandit statistics)."""
        return {}

    def load_state(self, state: dict, arrays: ArrayRecord) -> None:
        """Restore `state_dict()` and the global arrays of a checkpoint (resume)."""

    def initial_adapter(self) -> tuple[int, float] | None:
        """(r, lora_alpha) of the seeded fresh adapter that round 1 sends every client, for
        strategies whose clients start from the global factors (FedIT); None: start empty."""
        return None

    def num_rounds(self, configured: int) -> int:
        """Rounds to run for `num_rounds` in the config (one-shot runs one)."""
        return configured

    def deployments(self) -> dict[str, dict]:
        """Per client, the pruned model it deploys (FedSpine); {}: every client deploys the
        global adapter on the unpruned base."""
        return {}

    def export_metadata(self) -> dict:
        """Facts saved beside the exported adapter (e.g. what a late merge needs)."""
        return {"strategy": self.name}

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        """The algorithm: accepted updates → new global arrays, plus figures to log."""
        raise NotImplementedError

    def global_adapter(self, arrays: ArrayRecord) -> tuple[dict[str, torch.Tensor], int, float]:
        """The global model as one peft LoRA: (state, r, lora_alpha); empty state = base."""
        raise NotImplementedError

    def summary(self) -> None:
        ranks = self.ranks if self.ranks is not None else "per client"
        log(INFO, "\t├──> %s: ranks %s (cycled over partition ids), lora_alpha = %.3g·r, "
            "%d local steps", self.name, ranks, self.alpha_ratio, self.local_steps)
        super().summary()
