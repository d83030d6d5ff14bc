"""Tests of `parse_reply`: what a client reply must carry before it may be aggregated."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from strategies.lora_math import stack_factors
from strategies.replies import RejectedReply, parse_reply

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"
MODULE_SHAPES = {Q: (16, 16), V: (8, 16)}  # (out, in)
R = 2
SCALING = 4.0  # lora_alpha 8 / r 2


def adapter_state(r: int = R, seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-r adapter over MODULE_SHAPES, keyed like get_peft_model_state_dict."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, (n_out, n_in) in MODULE_SHAPES.items():
        state[module + ".lora_A.weight"] = torch.randn(r, n_in, generator=gen)
        state[module + ".lora_B.weight"] = torch.randn(n_out, r, generator=gen)
    return state


def reply(state: dict[str, torch.Tensor] | None = None,
          metrics: dict[str, float] | None = None) -> RecordDict:
    """A train reply: ArrayRecord 'arrays' and MetricRecord 'metrics'."""
    state = adapter_state() if state is None else state
    metrics = {"num-examples": 10.0, "train-loss": 1.0} if metrics is None else metrics
    return RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})


def test_valid_reply_is_accepted():
    # Prepare
    state = adapter_state(seed=3)

    # Execute
    update = parse_reply(reply(state, {"num-examples": 12.0, "train-loss": 0.5}),
                         MODULE_SHAPES, R, SCALING)

    # Assert
    assert update.rank == R
    assert update.weight == 12.0
    assert update.scaling == SCALING
    assert set(update.factors) == {Q, V}
    for module in (Q, V):
        a, b = update.factors[module]
        torch.testing.assert_close(a, state[module + ".lora_A.weight"])
        torch.testing.assert_close(b, state[module + ".lora_B.weight"])


def test_integer_num_examples_is_accepted():
    # Execute
    update = parse_reply(reply(metrics={"num-examples": 7}), MODULE_SHAPES, R, SCALING)

    # Assert
    assert update.weight == 7.0


def test_custom_weight_key():
    # Execute
    update = parse_reply(reply(metrics={"num-examples": 7.0, "num-tokens": 900.0}),
                         MODULE_SHAPES, R, SCALING, weight_key="num-tokens")

    # Assert
    assert update.weight == 900.0


def _without(key: str) -> dict[str, torch.Tensor]:
    state = adapter_state()
    del state[key]
    return state


def _with(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    state = adapter_state()
    state[key] = value
    return state


def _poisoned(key: str, value: float) -> dict[str, torch.Tensor]:
    state = adapter_state()
    state[key] = state[key].clone()
    state[key][1, 1] = value  # one bad entry in an otherwise finite tensor
    return state


BAD_ARRAYS = {
    "missing key": (_without(V + ".lora_B.weight"), f"missing ['{V}.lora_B.weight']"),
    "unexpected key": (_with(V + ".lora_C.weight", torch.zeros(2, 16)),
                       f"unexpected ['{V}.lora_C.weight']"),
    "wrong shape": (_with(Q + ".lora_A.weight", torch.zeros(R, 15)),
                    f"'{Q}.lora_A.weight' has shape (2, 15); expected (2, 16)"),
    "rank above the one assigned": (adapter_state(r=R + 1), "has shape (3, 16); expected (2, 16)"),
    "rank below the one assigned": (adapter_state(r=R - 1), "has shape (1, 16); expected (2, 16)"),
    "NaN": (_poisoned(V + ".lora_B.weight", float("nan")), f"'{V}.lora_B.weight' holds NaN or Inf"),
    "Inf": (_poisoned(Q + ".lora_B.weight", float("inf")), f"'{Q}.lora_B.weight' holds NaN or Inf"),
    "-Inf": (_poisoned(Q + ".lora_A.weight", float("-inf")),
             f"'{Q}.lora_A.weight' holds NaN or Inf"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_arrays_are_rejected(case):
    # Prepare
    state, reason = BAD_ARRAYS[case]

    # Execute / Assert
    with pytest.raises(RejectedReply) as err:
        parse_reply(reply(state), MODULE_SHAPES, R, SCALING)
    assert reason in str(err.value)


@pytest.mark.parametrize("value, shown", [(0.0, "0.0"), (-5.0, "-5.0"), (float("nan"), "nan"),
                                          (float("inf"), "inf"), (0, "0")])
def test_bad_num_examples_is_rejected(value, shown):
    # Execute / Assert
    with pytest.raises(RejectedReply) as err:
        parse_reply(reply(metrics={"num-examples": value, "train-loss": 1.0}),
                    MODULE_SHAPES, R, SCALING)
    assert f"metric 'num-examples' is {shown}; expected a positive number" in str(err.value)


def test_absent_num_examples_is_rejected():
    # Execute / Assert
    with pytest.raises(RejectedReply, match="metric 'num-examples' is None"):
        parse_reply(reply(metrics={"train-loss": 1.0}), MODULE_SHAPES, R, SCALING)


def test_missing_metrics_record_is_rejected():
    # Prepare
    content = RecordDict({"arrays": ArrayRecord(adapter_state())})

    # Execute / Assert
    with pytest.raises(RejectedReply, match="no MetricRecord 'metrics'"):
        parse_reply(content, MODULE_SHAPES, R, SCALING)


def test_missing_arrays_record_is_rejected():
    # Prepare
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10.0})})

    # Execute / Assert
    with pytest.raises(RejectedReply, match="no ArrayRecord 'arrays'"):
        parse_reply(content, MODULE_SHAPES, R, SCALING)


def test_rejected_reply_is_a_value_error():
    # Execute / Assert
    with pytest.raises(ValueError):
        parse_reply(RecordDict(), MODULE_SHAPES, R, SCALING)


def test_only_accepted_replies_reach_the_aggregate():
    # Prepare: valid, NaN, wrong shape, valid
    good_1 = reply(adapter_state(seed=1), {"num-examples": 10.0})
    good_2 = reply(adapter_state(seed=2), {"num-examples": 30.0})
    replies = [good_1, reply(_poisoned(Q + ".lora_A.weight", float("nan")), {"num-examples": 50.0}),
               reply(adapter_state(r=R + 1, seed=4), {"num-examples": 40.0}), good_2]

    # Execute
    accepted, rejected = [], []
    for content in replies:
        try:
            accepted.append(parse_reply(content, MODULE_SHAPES, R, SCALING))
        except RejectedReply as err:
            rejected.append(str(err))
    aggregate = stack_factors(accepted)
    alone = stack_factors([parse_reply(good_1, MODULE_SHAPES, R, SCALING),
                           parse_reply(good_2, MODULE_SHAPES, R, SCALING)])

    # Assert
    assert len(accepted) == 2 and len(rejected) == 2
    assert [u.weight for u in accepted] == [10.0, 30.0]
    for module in MODULE_SHAPES:
        a, b = aggregate[module]
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        torch.testing.assert_close(a, alone[module][0])
        torch.testing.assert_close(b, alone[module][1])
        # and the weights were renormalised over the two survivors: p = 1/4, 3/4
        s1 = adapter_state(seed=1)
        s2 = adapter_state(seed=2)
        expected = SCALING * (0.25 * s1[module + ".lora_B.weight"] @ s1[module + ".lora_A.weight"]
                              + 0.75 * s2[module + ".lora_B.weight"] @ s2[module + ".lora_A.weight"])
        torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-5)
