"""The ClientApp's handlers called directly: the identification query keeps the run's
setup in the node's context state and answers who the client is; a node without the setup
says so with the reason the server recognises (protocol.NO_SETUP)."""

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


def query(content: RecordDict | None = None) -> Message:
    return Message(content if content is not None else RecordDict(), dst_node_id=7,
                   message_type=MessageType.QUERY)


def setup_query(record: ConfigRecord | dict | None = None) -> Message:
    record = SETUP.to_config() if record is None else ConfigRecord(record)
    return query(RecordDict({"setup": record}))


def test_identify_keeps_the_setup_and_answers_the_identity():
    # Prepare
    context = make_context(partition_id=2, num_partitions=4)

    # Execute
    reply = client_app.identify(setup_query(), context)

    # Assert
    assert dict(reply.content.config_records["identity"].items()) == {
        "partition-id": 2, "num-partitions": 4, "client-name": "partition-2"}
    assert RunSetup.from_dict(context.state.config_records["setup"]) == SETUP
    assert client_app.run_setup(context) == SETUP


def test_identify_uses_the_configured_client_name():
    # Prepare
    context = make_context(partition_id=0, num_partitions=2, **{"client-name": "phone-a"})

    # Execute
    reply = client_app.identify(setup_query(), context)

    # Assert
    assert reply.content.config_records["identity"]["client-name"] == "phone-a"


def test_the_client_app_routes_the_query_to_identify():
    # Prepare
    context = make_context(partition_id=1, num_partitions=3)

    # Execute: through the ClientApp, as a SuperNode calls it
    reply = client_app.app(setup_query(), context)

    # Assert
    assert reply.content.config_records["identity"]["client-name"] == "partition-1"
    assert client_app.run_setup(context) == SETUP


def test_identify_without_setup_keeps_the_one_already_stored():
    # Prepare: the node met the server before; a later query carries no setup
    context = make_context()
    client_app.identify(setup_query(), context)

    # Execute
    reply = client_app.identify(query(), context)

    # Assert
    assert reply.content.config_records["identity"]["partition-id"] == 2
    assert client_app.run_setup(context) == SETUP


def test_identify_refuses_a_bad_setup_and_keeps_none():
    # Prepare
    record = SETUP.to_dict() | {"lr": -1.0}
    context = make_context()

    # Execute / Assert
    with pytest.raises(ValueError, match=r"train\.lr=-1\.0; allowed: a number > 0"):
        client_app.identify(setup_query(record), context)
    assert "setup" not in context.state.config_records


def test_identify_refuses_a_setup_with_a_missing_key():
    # Prepare
    record = SETUP.to_dict()
    del record["data-path"]

    # Execute / Assert
    with pytest.raises(KeyError, match="message config lacks 'data-path'"):
        client_app.identify(setup_query(record), make_context())


def test_identify_needs_the_partition_in_the_node_config():
    # Prepare
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})

    # Execute / Assert
    with pytest.raises(ValueError, match="node config lacks 'num-partitions'"):
        client_app.identify(setup_query(), context)


def test_run_setup_without_setup_names_the_reason_the_server_knows():
    # Execute / Assert
    with pytest.raises(RuntimeError) as err:
        client_app.run_setup(make_context())
    assert NO_SETUP in str(err.value)


def test_train_without_setup_fails_before_any_training():
    # Prepare: a restarted node that never received this run's setup
    order = TrainOrder(server_round=1, lora_r=4, lora_alpha=8.0, local_steps=1, seed=0)
    msg = Message(RecordDict({"arrays": ArrayRecord(), "config": order.to_config()}),
                  dst_node_id=7, message_type=MessageType.TRAIN)

    # Execute / Assert
    with pytest.raises(RuntimeError, match=NO_SETUP):
        client_app.train(msg, make_context())
