"""What every LoRA strategy here shares: who the clients are, what each is told, what is
accepted back, and a per-round log of bytes and losses.

Subclasses set `global_mode`, override `client_state` / `client_instructions` where a client
receives something particular, and `aggregate_updates` (the math, delegated to pure functions
in `lora_math`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Iterable, Mapping
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

from strategies.protocol import TrainInstructions
from strategies.devices import DeviceProfile
from strategies.lora_math import LoraUpdate
from strategies.replies import RejectedReply, parse_reply


@dataclass(frozen=True)
class ClientIdentity:
    """A client as the strategy knows it: stable across restarts, unlike a node id."""

    name: str
    partition_id: int


@dataclass
class Assignment:
    client: ClientIdentity
    instructions: TrainInstructions
    bytes_down: int


def config_bytes(record: ConfigRecord) -> int:
    """Approximate wire size of a ConfigRecord (flwr's own count_bytes fails on "")."""
    return len(json.dumps(dict(record.items())))


class LoraStrategy(FedAvg):
    """FedAvg's sampling and message plumbing, with per-client LoRA orders and checked replies.

    Args:
        template: the orders every client gets unless a subclass changes them per client.
        module_shapes: {peft module key: (out, in)} of the targeted layers, to check replies.
        ranks: LoRA rank per client, cycled over partition ids (one entry: homogeneous).
        alpha_ratio: lora_alpha = alpha_ratio · r for each client.
        seed: seeds client sampling and each round's client seeds.
        wait_seconds: how long to wait for `min_available_nodes` before giving up.
        devices: device profile per partition id (cycled): each accepted client's
            completion time (`completion-seconds` in the round log) follows its profile;
            None: measured compute plus transfer at 20 / 100 Mbit/s.
    """

    name = "lora"
    needs_initial_adapter = False  # True: round 1 sends a seeded fresh adapter (FedIT)
    # How clients use the global arrays: "none", "frozen" (beside the base) or "init"
    # (their trainable LoRA starts from them). See TrainInstructions.global_mode.
    global_mode = "none"

    def __init__(self, template: TrainInstructions, module_shapes: Mapping[str, tuple[int, int]],
                 ranks: list[int], alpha_ratio: float, seed: int = 0,
                 fraction_train: float = 1.0, min_train_nodes: int = 2,
                 min_available_nodes: int = 2, wait_seconds: float = 300.0,
                 devices: list[DeviceProfile] | None = None) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=min_train_nodes, min_available_nodes=min_available_nodes)
        if not ranks or any(int(r) <= 0 for r in ranks):
            raise ValueError(f"strategy.ranks={ranks}; allowed: a non-empty list of positive ints")
        self.template = template
        self.module_shapes = dict(module_shapes)
        self.ranks = [int(r) for r in ranks]
        self.alpha_ratio = alpha_ratio
        self.seed = seed
        self.wait_seconds = wait_seconds
        self.devices = list(devices) if devices else [DeviceProfile("default")]
        self.identities: dict[int, ClientIdentity] = {}
        self.assignments: dict[int, Assignment] = {}
        self.round_log: dict[int, dict] = {}
        self.sent: list[Message] = []

    # ------------------------------------------------------------------ who the clients are
    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Connected node ids; a clear error if too few come within `wait_seconds`.

        The first round waits for the whole federation (`min_available_nodes`); later rounds
        go on with whoever is online as long as `min_train_nodes` are, so a node that died
        does not stop the run."""
        needed, key = self.min_available_nodes, "scenario.num_clients"
        if self.identities:
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
        """Ask nodes we have not met yet for their partition id and name (a query message)."""
        unknown = [n for n in node_ids if n not in self.identities]
        if not unknown:
            return
        asks = [Message(RecordDict({"config": ConfigRecord({"ask": "identity"})}),
                        message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        for reply in grid.send_and_receive(asks, timeout=self.wait_seconds):
            if reply.has_error() or "identity" not in reply.content.config_records:
                log(WARNING, "A node did not identify itself: %s",
                    reply.error.reason if reply.has_error() else "no identity record")
                continue
            ident = reply.content.config_records["identity"]
            self.identities[reply.metadata.src_node_id] = ClientIdentity(
                name=str(ident["client-name"]), partition_id=int(ident["partition-id"]))

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        nodes = self.wait_for_nodes(grid)
        self.identify(grid, nodes)
        nodes = [n for n in nodes if n in self.identities]
        size = min(len(nodes), max(int(len(nodes) * self.fraction_train), self.min_train_nodes))
        rng = random.Random(self.seed * 100_003 + server_round)
        return sorted(rng.sample(nodes, size))

    # ------------------------------------------------------------------ what each is told
    def rank_for(self, client: ClientIdentity) -> int:
        return self.ranks[client.partition_id % len(self.ranks)]

    def device_for(self, client: ClientIdentity) -> DeviceProfile:
        return self.devices[client.partition_id % len(self.devices)]

    def client_instructions(self, server_round: int, client: ClientIdentity) -> TrainInstructions:
        r = self.rank_for(client)
        return dataclasses.replace(self.template, lora_r=r, lora_alpha=self.alpha_ratio * r,
                                   seed=self.seed * 1000 + server_round,
                                   global_mode=self.global_mode)

    def client_state(self, client: ClientIdentity,
                     state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What of the (non-empty) global state this client needs; default: all of it."""
        return state

    def client_arrays(self, client: ClientIdentity,
                      state: dict[str, torch.Tensor]) -> ArrayRecord:
        """`client_state` of the global state, in the wire dtype."""
        if not state:
            return ArrayRecord()
        dtype = getattr(torch, self.template.wire_dtype)
        return ArrayRecord({k: v.to(dtype) for k, v in self.client_state(client, state).items()})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = self.sample(grid, server_round)
        state = arrays.to_torch_state_dict()  # once per round, not once per client
        self.assignments = {}
        messages = []
        for node_id in node_ids:
            client = self.identities[node_id]
            inst = self.client_instructions(server_round, client)
            payload = self.client_arrays(client, state)
            record = inst.to_config()
            record["server-round"] = server_round
            self.assignments[node_id] = Assignment(client, inst,
                                                   payload.count_bytes() + config_bytes(record))
            messages.append(Message(RecordDict({"arrays": payload, "config": record}),
                                    message_type=MessageType.TRAIN, dst_node_id=node_id))
        chosen = ", ".join(f"{a.client.name}(r={a.instructions.lora_r})"
                           for a in self.assignments.values())
        self.sent = messages  # their message ids are filled in when the grid pushes them
        log(INFO, "configure_train: round %d, %d of %d clients: %s", server_round,
            len(node_ids), len(self.identities), chosen)
        return messages

    # ------------------------------------------------------------------ what comes back
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates: list[LoraUpdate] = []
        clients: dict[str, dict] = {}
        train_losses: list[tuple[float, float]] = []
        # An error reply made by the SuperLink (e.g. for a vanished node) comes from node 1:
        # find who it stands for through the message it answers.
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent
                if m.metadata.message_id}
        for msg in replies:
            node_id = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            assignment = self.assignments.get(node_id)
            name = assignment.client.name if assignment else f"node-{node_id}"
            entry: dict = {"bytes-down": assignment.bytes_down if assignment else 0}
            clients[name] = entry
            try:
                if msg.has_error():
                    raise RejectedReply(f"client error: {msg.error.reason}")
                if assignment is None:
                    raise RejectedReply("reply from a node that was not asked")
                inst = assignment.instructions
                entry["bytes-up"] = sum(r.count_bytes() for r in msg.content.array_records.values())
                update = self.parse_update(msg.content, inst)
            except RejectedReply as err:
                log(WARNING, "Round %d: rejected %s: %s", server_round, name, err)
                entry["status"] = f"rejected: {err}"
                continue
            metrics = msg.content.metric_records["metrics"]
            entry.update(status="ok", r=inst.lora_r, **{k: float(v) for k, v in metrics.items()})
            device = self.device_for(assignment.client)
            entry["device"] = device.name
            entry["completion-seconds"] = device.completion_seconds(
                entry.get("train-seconds", 0.0), entry["bytes-up"], entry["bytes-down"])
            train_losses.append((update.weight, float(metrics.get("train-loss", float("nan")))))
            updates.append(update)
        for node_id, assignment in self.assignments.items():  # asked but never answered
            clients.setdefault(assignment.client.name, {"bytes-down": assignment.bytes_down,
                                                        "status": "no reply"})
        for name, entry in sorted(clients.items()):
            log(INFO, "  %s: %s, r=%s, down %.3f MB, up %.3f MB, train-loss %s", name,
                entry.get("status"), entry.get("r", "-"), entry.get("bytes-down", 0) / 2**20,
                entry.get("bytes-up", 0) / 2**20, entry.get("train-loss", "-"))
        summary = {
            "clients": clients,
            "accepted": len(updates),
            "bytes-down": sum(c.get("bytes-down", 0) for c in clients.values()),
            "bytes-up": sum(c.get("bytes-up", 0) for c in clients.values()),
        }
        self.round_log[server_round] = summary
        if not updates:
            log(WARNING, "Round %d: no valid reply; the global adapter is unchanged", server_round)
            return None, None
        total = sum(w for w, _ in train_losses)
        summary["train-loss"] = sum(w * loss for w, loss in train_losses) / total
        arrays, extra = self.aggregate_updates(server_round, updates)
        summary.update(extra)
        metrics = MetricRecord({"train-loss": summary["train-loss"],
                                "num-examples": float(total), **extra})
        return arrays, metrics

    def parse_update(self, content: RecordDict, inst: TrainInstructions) -> LoraUpdate:
        """Check one reply against its orders (raises RejectedReply)."""
        return parse_reply(content, self.module_shapes, inst.lora_r, inst.lora_alpha / inst.lora_r)

    def state_dict(self) -> dict:
        """What a checkpoint must keep beyond the global arrays (e.g. bandit statistics)."""
        return {}

    def load_state(self, state: dict, arrays: ArrayRecord) -> None:
        """Restore `state_dict()` and the global arrays of a checkpoint (resume)."""

    def num_rounds(self, configured: int) -> int:
        """Rounds to run for `num_rounds` in the config (one-shot runs one)."""
        return configured

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
        log(INFO, "\t├──> %s: ranks %s (cycled over partition ids), lora_alpha = %.3g·r",
            self.name, self.ranks, self.alpha_ratio)
        super().summary()
