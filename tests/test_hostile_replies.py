"""Hostile replies, fuzzed with hypothesis: whatever a client sends back, its reply is
rejected with a reason, the round completes with the others, the global equals the one the
honest replies alone give, and nothing in the reply is decoded beyond the size of the
adapter that was asked for."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies.fedspine import FedSpine
from strategies.flora import FLoRA
from strategies.lora_math import LORA_A, LORA_B
from strategies.protocol import KEPT, KEPT_IN, KEPT_OUT, UNITS
from strategies.replies import HEADER_BYTES
from tests.test_fedspine import BANDIT, EDGE, MEMORY
from tests.test_strategies import (  # noqa: F401  (task_identity is an autouse fixture)
    MODULES,
    SETUP,
    FakeGrid,
    adapter,
    reply,
    task_identity,
)

KEYS = [m + side for m in MODULES for side in (LORA_A, LORA_B)]
TRIED = {"replies": 0}


def npy(value: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, value, allow_pickle=False)
    return out.getvalue()


def raw(dtype: str, shape: tuple, data: bytes) -> Array:
    """An Array whose declared dtype / shape / payload need not agree."""
    return Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray", data=data)


@st.composite
def hostile_arrays(draw, good: dict[str, torch.Tensor]) -> dict[str, Array]:
    """The honest rank-2 adapter with one fault injected."""
    arrays = {k: Array(v.numpy()) for k, v in good.items()}
    key = draw(st.sampled_from(KEYS))
    shape = tuple(good[key].shape)
    fault = draw(st.sampled_from(["dtype", "nonfinite", "rank", "name", "missing", "extra",
                                  "oversized", "header", "garbage", "huge-declared"]))
    if fault == "dtype":
        dtype = draw(st.sampled_from(["int8", "int64", "float64", "complex64", "bool", "<U3"]))
        arrays[key] = Array(np.zeros(shape, dtype=dtype))
    elif fault == "nonfinite":
        value = good[key].numpy().copy()
        value.flat[draw(st.integers(0, value.size - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf]))
        arrays[key] = Array(value)
    elif fault == "rank":  # another rank than asked, up to huge
        r = draw(st.sampled_from([1, 3, 64, 4096]))
        grown = (r, shape[1]) if key.endswith(LORA_A) else (shape[0], r)
        arrays[key] = Array(np.ones(grown, dtype=np.float32))
    elif fault == "name":
        arrays[draw(st.sampled_from([key.replace("layer", "layers"), key + ".x",
                                     key.upper()]))] = arrays.pop(key)
    elif fault == "missing":
        del arrays[key]
    elif fault == "extra":
        arrays[draw(st.text(min_size=1, max_size=20))] = Array(np.zeros(3, dtype=np.float32))
    elif fault == "oversized":  # the declared shape, a payload far larger (memory exhaustion)
        arrays[key] = raw("float32", shape, npy(good[key].numpy()) + bytes(
            draw(st.integers(HEADER_BYTES + 1, 8 << 20))))
    elif fault == "header":  # declares float16 / its shape, carries float32 / another shape
        other = draw(st.sampled_from([good[key].numpy(), np.zeros((1, 1), np.float16)]))
        arrays[key] = raw("float16", shape, npy(other))
    elif fault == "garbage":
        arrays[key] = raw("float32", shape, draw(st.binary(max_size=200)))
    else:  # declares a shape of billions of entries: refused before any allocation
        arrays[key] = raw("float32", (1 << 20, 1 << 20), npy(good[key].numpy()))
    return arrays


@st.composite
def hostile_metrics(draw) -> dict:
    metrics = {"num-examples": 10.0, "train-loss": 1.0}
    fault = draw(st.sampled_from(["missing", "count", "nonfinite", "list", "many", "seconds"]))
    if fault == "missing":
        del metrics["num-examples"]
    elif fault == "count":
        metrics["num-examples"] = draw(st.sampled_from([0, -1, -1e9, 0.0]))
    elif fault == "nonfinite":
        metrics[draw(st.sampled_from(["num-examples", "train-loss", "other"]))] = draw(
            st.sampled_from([math.nan, math.inf]))
    elif fault == "list":
        metrics[draw(st.sampled_from(["train-loss", "extra"]))] = [1.0, 2.0]
    elif fault == "many":
        metrics.update({f"m{i}": 1.0 for i in range(draw(st.integers(65, 500)))})
    else:
        metrics["train-seconds"] = draw(st.sampled_from([-1.0, math.nan]))
    return metrics


def honest_round(strategy, grid, hostile: Message | None = None):
    """Round 1: nodes 11 and 13 answer honestly (rank 2), node 12 with `hostile`."""
    messages = {m.metadata.dst_node_id: m for m in
                strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}
    replies = [reply(messages[11], adapter(2, 0), 10.0), reply(messages[13], adapter(2, 1), 30.0)]
    if hostile is not None:
        replies.insert(1, hostile(messages[12]))
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays, strategy.round_log[1]


def flora() -> FLoRA:
    return FLoRA(SETUP, MODULES, local_steps=1, ranks=[2], alpha_ratio=2.0,
                 min_available_nodes=3)


EXPECTED = {}


def expected_global() -> dict[str, torch.Tensor]:
    if not EXPECTED:
        arrays, log = honest_round(flora(), FakeGrid({11: 0, 12: 1, 13: 2}))
        assert log.accepted == 2
        EXPECTED.update(arrays.to_torch_state_dict())
    return EXPECTED


def assert_rejected_and_round_intact(arrays, log) -> None:
    TRIED["replies"] += 1
    status = log.clients["partition-1"].status
    assert status.startswith("rejected: ") and len(status) > len("rejected: ")
    assert log.accepted == 2
    got = arrays.to_torch_state_dict()
    assert got.keys() == expected_global().keys()
    for key, value in expected_global().items():
        torch.testing.assert_close(got[key], value)


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_hostile_adapter_arrays_are_rejected_and_the_round_goes_on(data):
    arrays = data.draw(hostile_arrays(adapter(2, 5)))

    def hostile(msg):
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(
            {"num-examples": 50.0, "train-loss": 1.0})}), reply_to=msg)

    assert_rejected_and_round_intact(*honest_round(flora(), FakeGrid({11: 0, 12: 1, 13: 2}),
                                                   hostile))


@FUZZ
@given(metrics=hostile_metrics())
def test_hostile_metrics_are_rejected_and_the_round_goes_on(metrics):
    def hostile(msg):
        content = RecordDict({"arrays": ArrayRecord(adapter(2, 5))})
        content["metrics"] = MetricRecord(metrics)
        return Message(content, reply_to=msg)

    assert_rejected_and_round_intact(*honest_round(flora(), FakeGrid({11: 0, 12: 1, 13: 2}),
                                                   hostile))


@settings(max_examples=100, deadline=None)
@given(record=st.sampled_from([KEPT, UNITS]), data=st.data())
def test_hostile_pruning_records_are_rejected(record, data):
    """FedSpine's kept indices and structures are client input too."""
    strategy = FedSpine(SETUP, MODULES, local_steps=1, alpha_ratio=2.0, min_available_nodes=1,
                        memory=MEMORY, bandit={**BANDIT, "ranks": [2]}, devices=[EDGE],
                        prune={"slices": 1})
    msg = next(iter(strategy.configure_train(1, ArrayRecord(), ConfigRecord(),
                                             FakeGrid({11: 0}))))
    q = next(iter(MODULES))
    if record == KEPT:
        key = data.draw(st.sampled_from([q + KEPT_OUT, q + KEPT_IN, "nope" + KEPT_IN]))
    else:
        key = data.draw(st.sampled_from(["0.mlp", "0.self_attn", "x.mlp"]))
    fault = data.draw(st.sampled_from(["float", "2-D", "huge", "oversized", "negative"]))
    value = {"float": raw("float32", (2,), npy(np.zeros(2, np.float32))),
             "2-D": Array(np.zeros((2, 2), np.int64)),
             "huge": raw("int64", (1 << 40,), npy(np.zeros(2, np.int64))),
             "oversized": raw("int64", (2,), npy(np.arange(2)) + bytes(1 << 20)),
             "negative": Array(np.array([-5, 1 << 62], np.int64))}[fault]
    content = RecordDict({"arrays": ArrayRecord(adapter(2, 5)), "metrics": MetricRecord(
        {"num-examples": 5.0, "train-loss": 1.0, "train-seconds": 1.0, "loss-before": 2.0,
         "loss-after": 1.0}), record: ArrayRecord({key: value})})
    if record == KEPT and key.startswith(q):  # the other side, honest
        other = q + (KEPT_IN if key.endswith(KEPT_OUT) else KEPT_OUT)
        content[KEPT][other] = Array(np.arange(MODULES[q][other.endswith(KEPT_IN)]))
    TRIED["replies"] += 1

    strategy.aggregate_train(1, [Message(content, reply_to=msg)])

    assert strategy.round_log[1].clients["partition-0"].status.startswith("rejected: ")


def test_report_the_number_of_fuzzed_replies():
    """Runs last in this file: every fuzzed reply above was tried and rejected."""
    if TRIED["replies"] == 0:
        pytest.skip("run with the fuzz tests above")
    print(f"\n{TRIED['replies']} hostile replies tried, all rejected, 0 crashes")
