"""The ClientApp's handlers called directly: the identification query answers who the
client is; the first train message's run setup is kept in the node's context state for
later rounds; a node without the setup says so with the reason the server recognises
(protocol.NO_SETUP)."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedapp import client_app
from strategies.protocol import NO_SETUP, DataSpec, RunSetup, TrainOrder

SETUP = RunSetup(model_path="models/tiny", quantization="none", target_modules=("q_proj",),
                 lr=1e-3, batch_size=2, max_length=32, partitioner="iid", partitioner_alpha=0.0,
                 data=DataSpec(seed=3))


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def make_context(partition_id: int = 2, num_partitions: int = 4, **node_config) -> Context:
    config = {"partition-id": partition_id, "num-partitions": num_partitions, **node_config}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def query() -> Message:
    return Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)


def train_message(setup: ConfigRecord | dict | None = None) -> Message:
    """A round-1 train message; with `setup`, it carries the run setup as a first one does."""
    order = TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=1, seed=0)
    content = RecordDict({"arrays": ArrayRecord(), "config": order.to_config()})
    if setup is not None:
        content["setup"] = ConfigRecord(setup)
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def test_identify_answers_who_the_client_is():
    # Execute
    reply = client_app.identify(query(), make_context(partition_id=2, num_partitions=4))
    named = client_app.identify(query(), make_context(0, 2, **{"client-name": "phone-a"}))

    # Assert
    assert dict(reply.content.config_records["identity"].items()) == {
        "partition-id": 2, "num-partitions": 4, "client-name": "partition-2"}
    assert named.content.config_records["identity"]["client-name"] == "phone-a"


def test_the_client_app_routes_the_query_to_identify():
    # Execute: through the ClientApp, as a SuperNode calls it
    reply = client_app.app(query(), make_context(partition_id=1, num_partitions=3))

    # Assert
    assert reply.content.config_records["identity"]["client-name"] == "partition-1"


def test_the_first_train_message_setup_is_kept_for_later_rounds():
    # Prepare
    context = make_context()

    # Execute: round 1 carries the setup, round 2 does not
    first = client_app.stored_setup(train_message(SETUP.to_dict()), context)
    later = client_app.stored_setup(train_message(), context)

    # Assert
    assert first == later == SETUP
    assert RunSetup.from_dict(context.state.config_records["setup"]) == SETUP


def test_a_bad_setup_is_refused_by_key_and_nothing_is_kept():
    # Prepare
    context = make_context()
    missing = SETUP.to_dict()
    del missing["data-path"]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"train\.lr=-1\.0; allowed: a number > 0"):
        client_app.stored_setup(train_message(SETUP.to_dict() | {"lr": -1.0}), context)
    with pytest.raises(KeyError, match="message config lacks 'data-path'"):
        client_app.stored_setup(train_message(missing), context)
    assert "setup" not in context.state.config_records


def test_identify_needs_the_partition_in_the_node_config():
    # Prepare
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})

    # Execute / Assert
    with pytest.raises(ValueError, match="node config lacks 'num-partitions'"):
        client_app.identify(query(), context)


def test_train_without_setup_fails_before_any_training_with_the_reason_the_server_knows():
    # Prepare: a restarted node that lost this run's setup; its order carries none
    context = make_context()

    # Execute / Assert
    with pytest.raises(RuntimeError) as err:
        client_app.train(train_message(), context)
    assert NO_SETUP in str(err.value)
