"""The Flower ClientApp: identifies itself, keeps the run's setup, and trains when asked.

Its Flower `context.state` (kept across rounds) holds the run's setup and, for FLoRA's
versioned downlink, the global update it holds with its version and its last upload.
"""

from __future__ import annotations

import time

import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedapp.client.round import run_round
from fedapp.client.selection import selection_metrics
from fedapp.client.zeroth import zo_round
from fedapp.llm.memory import allocator
from strategies.flora import receive_global
from strategies.global_version import GlobalVersion
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    GLOBAL,
    IDENTITY,
    KEPT,
    METRICS,
    NO_SETUP,
    SETUP,
    UNITS,
    RunSetup,
    TrainOrder,
)

app = ClientApp()
# context.state keys: the global update this node holds, its version, and its last upload
HELD_GLOBAL, HELD_VERSION, LAST_UPLOAD = "held-global", "held-version", "last-upload"
_PROCESS_SEEN_A_MESSAGE = False


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, with a clear error if absent."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}: start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None


def stored_setup(msg: Message, context: Context) -> RunSetup:
    """The run's RunSetup: from the message when the server sends it (its first train
    message to this client), which is then kept in context.state for later rounds."""
    if SETUP in msg.content.config_records:
        setup = RunSetup.from_dict(msg.content.config_records[SETUP])  # validated
        context.state.config_records[SETUP] = msg.content.config_records[SETUP]
        return setup
    if SETUP not in context.state.config_records:
        raise RuntimeError(f"{NO_SETUP}: this node has no RunSetup in its context state (the "
                           "SuperNode restarted since the server sent it?); the server sends "
                           "it again with the next round's order")
    return RunSetup.from_dict(context.state.config_records[SETUP])


def held_global(msg: Message, context: Context, setup: RunSetup) -> dict[str, torch.Tensor]:
    """The global arrays to train with. When the message names a global version (FLoRA),
    they are that version, sent whole or rebuilt from this node's held copy and its last
    upload, or its held copy corrected towards it (`strategies.flora.receive_global`), and
    kept in context.state for next time, with the version and whether it is exact."""
    arrays = msg.content[ARRAYS].to_torch_state_dict()
    if GLOBAL not in msg.content.config_records:
        return arrays
    version = GlobalVersion.from_dict(msg.content.config_records[GLOBAL])
    state = context.state
    held = state.array_records[HELD_GLOBAL].to_torch_state_dict() \
        if HELD_GLOBAL in state.array_records else None
    record = state.config_records.get(HELD_VERSION, ConfigRecord())
    held_version = int(record["version"]) if "version" in record else None  # type: ignore[arg-type]
    upload = state.array_records[LAST_UPLOAD].to_torch_state_dict() \
        if LAST_UPLOAD in state.array_records else None
    global_state = receive_global(version, arrays, held, held_version, upload,
                                  getattr(torch, setup.wire_dtype),
                                  held_exact=bool(record.get("exact", True)))
    state[HELD_GLOBAL] = ArrayRecord(global_state)
    state[HELD_VERSION] = ConfigRecord({"version": version.version,
                                        "exact": version.correction is None})
    return global_state


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server who this client is, by something stabler than the node id."""
    partition_id, num_partitions = node_partition(context)
    name = str(context.node_config.get("client-name", f"partition-{partition_id}"))
    reply = ConfigRecord({"partition-id": partition_id, "num-partitions": num_partitions,
                          "client-name": name})
    return Message(RecordDict({IDENTITY: reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Carry out the round's order on the local partition; reply with the adapter."""
    received = time.time()
    setup = stored_setup(msg, context)
    order = TrainOrder.from_dict(msg.content[CONFIG])
    partition_id, num_partitions = node_partition(context)
    global_state = held_global(msg, context, setup)
    units = msg.content[UNITS].to_torch_state_dict() if UNITS in msg.content.array_records \
        else {}
    if order.zo is not None:  # FedKSeed
        result = zo_round(setup, order, partition_id, num_partitions, global_state)
    else:
        result = run_round(setup, order, partition_id, num_partitions, global_state,
                           units=units)
    if GLOBAL in msg.content.config_records:  # the server may build on it next round
        context.state[LAST_UPLOAD] = ArrayRecord(result.state)
    metrics = result.metrics | selection_metrics()  # its seconds in the round it selected
    # Overhead before training starts: model/data loading within the handler; and how old
    # the process was when its first message came (a deployed SuperNode starts a ClientApp
    # process per message, ahead of it, so this includes idle waiting; a simulation actor
    # serves many messages and reports 0 after its first).
    metrics["setup-seconds"] = metrics.pop("training-started") - received
    metrics["process-start-seconds"] = 0.0
    metrics["jemalloc"] = float(allocator() == "jemalloc")  # what its peak-rss-mb ran on
    if not _PROCESS_SEEN_A_MESSAGE:
        metrics["process-start-seconds"] = max(received - psutil.Process().create_time(), 0.0)
        globals()["_PROCESS_SEEN_A_MESSAGE"] = True
    content = RecordDict({ARRAYS: ArrayRecord(result.state), METRICS: MetricRecord(metrics)})
    if result.kept:
        content[KEPT] = ArrayRecord(result.kept)
    if result.units:
        content[UNITS] = ArrayRecord(result.units)
    return Message(content, reply_to=msg)
