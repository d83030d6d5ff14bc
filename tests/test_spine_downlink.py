"""FedSpine's downlink: each device gets the global update G (and, with `personal`, its own
residual) cut to the rows / columns its layers kept after its last accepted round."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from strategies.lora_math import join_factors, split_factors
from tests.test_fedspine import Q, V, first_round, kept_reply, spine
from tests.test_strategies import FakeGrid, task_identity  # noqa: F401


@pytest.mark.parametrize("personal", [False, True])
def test_the_downlink_is_g_cut_to_the_rows_and_columns_the_device_kept(personal):
    strategy = spine(num_rounds=3, personal=personal)
    messages, ranks = first_round(strategy)
    replies = [kept_reply(messages[11], [0, 2, 5], ranks[11], seed=1)[0],
               kept_reply(messages[12], [1, 2, 3, 4], ranks[12], seed=2)[0]]
    arrays, _ = strategy.aggregate_train(1, replies)

    second = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        2, arrays, ConfigRecord(), FakeGrid({11: 0, 12: 1}))}

    g = split_factors(arrays.to_torch_state_dict())
    for node, name, rows in ((11, "partition-0", [0, 2, 5]), (12, "partition-1", [1, 2, 3, 4])):
        whole = {m: (torch.cat([a, strategy.residual[name][m][0]]),
                     torch.cat([b, strategy.residual[name][m][1]], dim=1))
                 for m, (a, b) in g.items()} if personal else g
        sent = split_factors(second[node].content["arrays"].to_torch_state_dict())
        assert sent.keys() == whole.keys()
        for got, want in ((sent[Q][0], whole[Q][0]), (sent[Q][1], whole[Q][1][rows]),
                          (sent[V][0], whole[V][0]), (sent[V][1], whole[V][1])):
            assert torch.equal(got, want.to(got.dtype))  # in the wire dtype
        assert second[node].content["arrays"].count_bytes() < ArrayRecord(
            join_factors(whole)).count_bytes()


@pytest.mark.parametrize("drop_kept", [False, True])
def test_a_resumed_run_cuts_g_as_before_and_an_older_checkpoint_sends_all_of_it(drop_kept):
    strategy = spine(num_rounds=3)
    messages, ranks = first_round(strategy)
    arrays, _ = strategy.aggregate_train(1, [kept_reply(messages[11], [0, 2, 5], ranks[11],
                                                        seed=1)[0]])
    state = strategy.state_dict()
    if drop_kept:  # a checkpoint written before the cut downlink
        del state["kept"]
    resumed = spine(num_rounds=3)
    resumed.load_state(state, arrays)

    message = next(m for m in resumed.configure_train(2, arrays, ConfigRecord(),
                                                      FakeGrid({11: 0, 12: 1}))
                   if m.metadata.dst_node_id == 11)
    g = split_factors(arrays.to_torch_state_dict())
    sent = split_factors(message.content["arrays"].to_torch_state_dict())
    rows = slice(None) if drop_kept else [0, 2, 5]
    assert torch.equal(sent[Q][1], g[Q][1][rows].to(sent[Q][1].dtype))
    assert torch.equal(sent[V][1], g[V][1].to(sent[V][1].dtype))
