"""The Flower ClientApp: identifies itself, and trains a LoRA when asked."""

from __future__ import annotations

import time

import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedapp.client.round import run_round
from strategies.protocol import TrainInstructions
from fedapp.client.spine import run_spine_round

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


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server who this client is, by something stabler than the node id."""
    partition_id, num_partitions = node_partition(context)
    name = str(context.node_config.get("client-name", f"partition-{partition_id}"))
    reply = ConfigRecord({"partition-id": partition_id, "num-partitions": num_partitions,
                          "client-name": name})
    return Message(RecordDict({"identity": reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune a fresh LoRA on the local partition and reply with its factors."""
    received = time.time()
    inst = TrainInstructions.from_config(msg.content["config"])
    partition_id, num_partitions = node_partition(context)
    global_state = msg.content["arrays"].to_torch_state_dict()
    kept = {}
    if inst.spine_round:  # FedSpine: prune, tune, and say which units were kept
        state, metrics, kept = run_spine_round(inst, partition_id, num_partitions, global_state)
    else:
        state, metrics = run_round(inst, partition_id, num_partitions, global_state)
    # Overhead before training starts: model/data loading within the handler; and how old
    # the process was when its first message came (a deployed SuperNode starts a ClientApp
    # process per message, ahead of it, so this includes idle waiting; a simulation actor
    # serves many messages and reports 0 after its first).
    metrics["setup-seconds"] = metrics.pop("training-started") - received
    metrics["process-start-seconds"] = 0.0
    if not _PROCESS_SEEN_A_MESSAGE:
        metrics["process-start-seconds"] = max(received - psutil.Process().create_time(), 0.0)
        globals()["_PROCESS_SEEN_A_MESSAGE"] = True
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    if kept:
        content["kept"] = ArrayRecord(kept)
    return Message(content, reply_to=msg)
