"""Strategies driven through Flower's message API with a fake Grid: who gets what, which
replies are accepted, and what the aggregate is."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies.fedit import FedIT
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.lora_math import LORA_A, LORA_B, LoraUpdate, exact_delta
from strategies.protocol import NO_SETUP, RunSetup, TrainOrder
from strategies.zeropad import ZeroPad

MODULES = {"base_model.model.layer.q_proj": (6, 5), "base_model.model.layer.v_proj": (3, 5)}
SETUP = RunSetup(model_path="m", quantization="nf4", target_modules=("q_proj",), lr=0.1,
                 batch_size=1, max_length=8, partitioner="iid", partitioner_alpha=0.0)


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class FakeGrid:
    """Connected nodes that answer the identity query (each query is kept in `queries`);
    training replies come from tests."""

    def __init__(self, partitions: dict[int, int]) -> None:
        self.partitions = partitions
        self.queries: list[Message] = []

    def get_node_ids(self):
        return list(self.partitions)

    def push_messages(self, messages):
        """Answer at once; the ids returned are those of the messages answered."""
        self.pending = list(self.send_and_receive(messages))
        return [r.metadata.reply_to_message_id for r in self.pending]

    def pull_messages(self, message_ids):
        replies, self.pending = self.pending, []
        return replies

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            self.queries.append(msg)
            pid = self.partitions[msg.metadata.dst_node_id]
            ident = ConfigRecord({"partition-id": pid, "num-partitions": len(self.partitions),
                                  "client-name": f"partition-{pid}"})
            replies.append(Message(RecordDict({"identity": ident}), reply_to=msg))
        return replies


def adapter(r: int, seed: int, poison: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out_f, in_f) in MODULES.items():
        state[module + LORA_A] = torch.randn(r, in_f, generator=gen)
        state[module + LORA_B] = torch.randn(out_f, r, generator=gen)
    if poison:
        state[next(iter(state))][0, 0] = float("nan")
    return state


def reply(msg: Message, state: dict, n: float) -> Message:
    content = RecordDict({"arrays": ArrayRecord(state),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})})
    return Message(content, reply_to=msg)


def test_flora_assigns_ranks_by_partition_and_aggregates_only_valid_replies():
    grid = FakeGrid({11: 0, 12: 1, 13: 2, 14: 3})
    strategy = FLoRA(SETUP, MODULES, local_steps=1, ranks=[2, 4], alpha_ratio=2.0,
                     min_available_nodes=4)

    messages = {m.metadata.dst_node_id: m for m in
                strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}
    ranks = {n: m.content["config"]["lora-r"] for n, m in messages.items()}
    good = {11: adapter(2, 0), 13: adapter(2, 1)}
    replies = [reply(messages[11], good[11], 10.0),
               reply(messages[12], adapter(4, 2, poison=True), 50.0),
               reply(messages[13], good[13], 30.0),
               Message(Error(code=0, reason="client crashed"), reply_to=messages[14])]
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert ranks == {11: 2, 12: 4, 13: 2, 14: 4}
    assert {m.content["config"]["global-mode"] for m in messages.values()} == {"frozen"}
    log = strategy.round_log[1]
    assert log.accepted == 2
    assert "NaN" in log.clients["partition-1"].status
    assert "client crashed" in log.clients["partition-3"].status
    assert log.bytes_up == sum(ArrayRecord(s).count_bytes() for s in good.values()) + \
        ArrayRecord(adapter(4, 2)).count_bytes()
    # the global is the exact stack of the uploads at wire precision, held in fp16 itself
    expected = [LoraUpdate(strategy_factors({k: v.half() for k, v in good[n].items()}), 2.0, w)
                for n, w in ((11, 10.), (13, 30.))]
    state, r, alpha = strategy.global_adapter(arrays)
    assert (r, alpha) == (4, 4.0) and state[next(iter(state))].dtype == torch.float16
    for module in MODULES:
        torch.testing.assert_close(state[module + LORA_B].float() @ state[module + LORA_A].float(),
                                   exact_delta(expected, module), rtol=2e-3, atol=2e-3)
    assert metrics["train-loss"] == 1.0


def strategy_factors(state):
    return {m: (state[m + LORA_A], state[m + LORA_B]) for m in MODULES}


def test_flora_partial_participation_sends_only_to_selected_clients():
    grid = FakeGrid({1: 0, 2: 1, 3: 2, 4: 3})
    strategy = FLoRA(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=1.0,
                     fraction_train=0.5, min_train_nodes=2, min_available_nodes=4)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, [reply(m, adapter(2, i), 1.0)
                                             for i, m in enumerate(msgs)])

    round2 = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))

    assert len(msgs) == 2 and len(round2) == 2
    for m in round2:  # the selected clients get the rank-4 global factors, in fp16
        a = m.content["arrays"].to_torch_state_dict()["base_model.model.layer.q_proj" + LORA_A]
        assert a.shape == (4, 5) and a.dtype == torch.float16
    factor_bytes = sum(2 * 4 * (o + i) for o, i in MODULES.values())  # fp16, rank 4
    assert all(a.bytes_down > factor_bytes for a in strategy.assignments.values())


def test_fedit_averages_factors_and_reports_aggregation_noise():
    grid = FakeGrid({1: 0, 2: 1})
    strategy = FedIT(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=2.0)
    msgs = list(strategy.configure_train(1, ArrayRecord(adapter(2, 9)), ConfigRecord(), grid))
    states = [adapter(2, 5), adapter(2, 6)]

    arrays, metrics = strategy.aggregate_train(1, [reply(m, s, n) for m, s, n in
                                                   zip(msgs, states, (1.0, 3.0))])

    got = arrays.to_torch_state_dict()
    for key in states[0]:
        torch.testing.assert_close(got[key], 0.25 * states[0][key] + 0.75 * states[1][key])
    assert {m.content["config"]["global-mode"] for m in msgs} == {"init"}
    assert metrics["aggregation-noise"] > 0
    assert strategy.initial_adapter() == (2, 4.0)  # round 1 starts from a seeded rank-2 LoRA
    assert FLoRA(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=2.0
                 ).initial_adapter() is None  # FLoRA's clients start from the base


def test_no_valid_reply_leaves_the_global_adapter_unchanged():
    grid = FakeGrid({1: 0, 2: 1})
    strategy = FLoRA(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=1.0)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))

    arrays, metrics = strategy.aggregate_train(1, [reply(m, adapter(3, 0), 1.0) for m in msgs])

    assert arrays is None and metrics is None
    assert all("expected" in c.status or "differ" in c.status
               for c in strategy.round_log[1].clients.values())


def test_too_few_nodes_ends_with_a_clear_message_within_the_deadline():
    strategy = FLoRA(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=1.0,
                     min_available_nodes=3, wait_seconds=1.0)

    with pytest.raises(RuntimeError, match="only 2 client node.* at least 3"):
        list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid({1: 0, 2: 1})))


def test_after_the_first_round_a_lost_node_does_not_stop_the_run():
    grid = FakeGrid({1: 0, 2: 1, 3: 2})
    strategy = FLoRA(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=1.0,
                     min_available_nodes=3, min_train_nodes=2, wait_seconds=1.0)
    first = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    del grid.partitions[3]  # node 3 dies

    second = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid))
    del grid.partitions[2]

    assert len(first) == 3 and sorted(m.metadata.dst_node_id for m in second) == [1, 2]
    with pytest.raises(RuntimeError, match="only 1 client node.*min_train_nodes asks for at least 2"):
        list(strategy.configure_train(3, ArrayRecord(), ConfigRecord(), grid))


def test_a_federation_that_lost_its_setup_still_needs_only_min_train_nodes():
    # Prepare: round 1 met all three nodes; all answer that they lost the run setup
    grid = FakeGrid({1: 0, 2: 1, 3: 2})
    strategy = FLoRA(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=1.0,
                     min_available_nodes=3, min_train_nodes=2, wait_seconds=1.0)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    strategy.aggregate_train(1, [Message(Error(code=0, reason=NO_SETUP), reply_to=m)
                                 for m in msgs])
    del grid.partitions[3]  # and node 3 does not come back

    # Execute
    second = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid))

    # Assert: the two nodes left are met again and train; the run does not wait for 3
    assert sorted(m.metadata.dst_node_id for m in second) == [1, 2]


def test_the_setup_goes_once_per_client_and_again_after_no_setup():
    # Prepare: rounds 1 and 2 with nodes 1 and 2; in round 2 node 1 says it lost the setup
    grid = FakeGrid({1: 0, 2: 1})
    strategy = FLoRA(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=1.0)

    def train_round(server_round: int, lost: set[int]) -> dict[int, Message]:
        msgs = {m.metadata.dst_node_id: m for m in
                strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)}
        strategy.aggregate_train(server_round, [
            Message(Error(code=0, reason=f"ClientApp: {NO_SETUP}"), reply_to=m) if n in lost
            else reply(m, adapter(2, n), 1.0) for n, m in msgs.items()])
        return msgs

    # Execute
    rounds = [train_round(1, set()), train_round(2, {1}), train_round(3, set())]

    # Assert: the setup rides on each node's first train message only, and on node 1's
    # next one after it said it lost it; it is counted in that message's bytes down
    def carries(msg: Message) -> bool:
        return "setup" in msg.content.config_records

    assert [sorted(n for n, m in r.items() if carries(m)) for r in rounds] == [[1, 2], [], [1]]
    assert RunSetup.from_dict(rounds[0][1].content.config_records["setup"]) == SETUP
    assert NO_SETUP in strategy.round_log[2].clients["partition-0"].status
    assert len(grid.queries) == 2  # each node identified once
    down = {r: strategy.round_log[r].clients["partition-1"].bytes_down for r in (1, 2)}
    assert down[1] > down[2]


def test_train_orders_are_small_and_carry_no_run_wide_values():
    grid = FakeGrid({1: 0, 2: 1})
    strategy = FLoRA(SETUP, MODULES, local_steps=3, ranks=[2, 4], alpha_ratio=2.0, seed=7)

    msgs = list(strategy.configure_train(5, ArrayRecord(), ConfigRecord(), grid))

    for msg in msgs:
        record = msg.content.config_records["config"]
        assert len(record) <= 10
        assert not {"lr", "model-path", "batch-size", "max-length", "target-modules",
                    "quantization", "data-path"} & set(record.keys())
        r = 2 if msg.metadata.dst_node_id == 1 else 4
        assert TrainOrder.from_dict(record) == TrainOrder(
            server_round=5, lora_r=r, lora_alpha=2.0 * r, local_steps=3, seed=7005,
            global_mode="frozen")


@pytest.mark.parametrize("cls,ranks,extra", [(FLoRA, [2, 4, 3], {"rank_budget": 4}),
                                             (FedIT, [2], {}), (ZeroPad, [2, 4, 3], {}),
                                             (FlexLoRA, [2, 4, 3], {})])
def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(cls, ranks, extra):
    """Replies arrive in whatever order the network delivers them; the stacking (and its
    SVD) must see them in one fixed order, or reruns and resumed runs drift apart."""
    results = []
    for order in ([11, 12, 13], [13, 11, 12]):
        strategy = cls(SETUP, MODULES, local_steps=1, ranks=ranks, alpha_ratio=2.0,
                       min_available_nodes=3, **extra)
        msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(
            1, ArrayRecord(), ConfigRecord(), FakeGrid({11: 0, 12: 1, 13: 2}))}
        states = {n: adapter(int(msgs[n].content["config"]["lora-r"]), n) for n in msgs}
        arrays, metrics = strategy.aggregate_train(
            1, [reply(msgs[n], states[n], float(n)) for n in order])
        results.append((arrays.to_torch_state_dict(), dict(metrics)))
    (first, m1), (second, m2) = results
    assert m1 == m2 and first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
