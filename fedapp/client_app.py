"""The Flower ClientApp: identifies itself, keeps the run's setup, and trains when asked."""

from __future__ import annotations

import time

import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedapp.client.round import run_round
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    IDENTITY,
    KEPT,
    METRICS,
    NO_SETUP,
    SETUP,
    RunSetup,
    TrainOrder,
)

app = ClientApp()
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
    global_state = msg.content[ARRAYS].to_torch_state_dict()
    result = run_round(setup, order, partition_id, num_partitions, global_state)
    metrics = result.metrics
    # Overhead before training starts: model/data loading within the handler; and how old
    # the process was when its first message came (a deployed SuperNode starts a ClientApp
    # process per message, ahead of it, so this includes idle waiting; a simulation actor
    # serves many messages and reports 0 after its first).
    metrics["setup-seconds"] = metrics.pop("training-started") - received
    metrics["process-start-seconds"] = 0.0
    if not _PROCESS_SEEN_A_MESSAGE:
        metrics["process-start-seconds"] = max(received - psutil.Process().create_time(), 0.0)
        globals()["_PROCESS_SEEN_A_MESSAGE"] = True
    content = RecordDict({ARRAYS: ArrayRecord(result.state), METRICS: MetricRecord(metrics)})
    if result.kept:
        content[KEPT] = ArrayRecord(result.kept)
    return Message(content, reply_to=msg)
