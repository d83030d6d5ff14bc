"""Checking a client's reply before it may touch the aggregate.

A reply is accepted only if it carries every expected adapter array with the shape the
assigned rank implies, as float16 or float32, finite values, a positive finite
`num-examples`, and at most `MAX_METRICS` metrics, all finite numbers. Anything else is
rejected with a reason that names what was wrong; the round goes on without it.

Parsing allocates no more than the adapter that was asked for: an array's declared dtype and
shape are checked, and its payload size against them, before it is decoded (`read_arrays`),
so an oversized or inconsistent array is refused unread. (What reaches the server at all is
bounded by the transport's message size limit, the SuperLink's.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from strategies.lora_math import LORA_A, LORA_B, LoraUpdate, split_factors
from strategies.protocol import ARRAYS, METRICS


class RejectedReply(ValueError):
    """A client reply that must not be aggregated; the message says why."""


FACTOR_DTYPES = ("float16", "float32")  # what a client may send LoRA factors as
INDEX_DTYPES = ("int32", "int64")  # ... and kept indices / structures as
HEADER_BYTES = 1024  # an .npy header is about 128 bytes
MAX_METRICS = 64


def read_arrays(record: ArrayRecord, wanted: Mapping[str, tuple[int, ...] | int], what: str,
                dtypes: tuple[str, ...] | Mapping[str, tuple[str, ...]] = FACTOR_DTYPES
                ) -> dict[str, torch.Tensor]:
    """The record's arrays as tensors, each checked before it is decoded: exactly the keys
    of `wanted`, a dtype of `dtypes` (or of `dtypes[key]`), the wanted shape (an int n: any 1-D shape of at most n
    entries), a payload no larger than that shape needs, and a decoded array that agrees
    with its declared dtype and shape. Raises RejectedReply naming the first fault."""
    missing = sorted(set(wanted) - set(record.keys()))
    extra = sorted(set(record.keys()) - set(wanted))
    if missing or extra:
        raise RejectedReply(f"{what} keys differ from what was asked for: missing "
                            f"{missing[:2]}, unexpected {[str(k)[:80] for k in extra[:2]]}")
    out = {}
    for key, shape in wanted.items():
        array = record[key]
        allowed = dtypes[key] if isinstance(dtypes, Mapping) else dtypes
        if array.dtype not in allowed:
            raise RejectedReply(f"'{key}' has dtype {str(array.dtype)[:40]!r}; allowed: "
                                f"{list(allowed)}")
        declared = tuple(array.shape)
        if isinstance(shape, int):
            if len(declared) != 1 or not 0 <= declared[0] <= shape:
                raise RejectedReply(f"'{key}' has shape {declared[:4]}; allowed: 1-D with at "
                                    f"most {shape} entries")
        elif declared != tuple(shape):
            raise RejectedReply(f"'{key}' has shape {declared[:4]}; expected {tuple(shape)}")
        limit = math.prod(declared) * np.dtype(array.dtype).itemsize + HEADER_BYTES
        if len(array.data) > limit:
            raise RejectedReply(f"'{key}' carries {len(array.data)} bytes for a {declared} "
                                f"{array.dtype} array; at most {limit}")
        try:
            value = array.numpy()
        except (ValueError, TypeError, OSError, EOFError) as err:
            raise RejectedReply(f"'{key}' is not a readable array: {str(err)[:120]}") from None
        if value.dtype.name != array.dtype or value.shape != declared:
            raise RejectedReply(f"'{key}' decodes to {value.dtype.name} {value.shape}, not the "
                                f"{array.dtype} {declared} it declares")
        tensor = torch.from_numpy(value)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RejectedReply(f"'{key}' holds NaN or Inf")
        out[key] = tensor
    return out


def check_metrics(content: RecordDict) -> None:
    """At most MAX_METRICS metrics, every one a finite number (a list or NaN is refused)."""
    if METRICS not in content.metric_records:
        raise RejectedReply(f"reply has no MetricRecord '{METRICS}'")
    metrics = content.metric_records[METRICS]
    if len(metrics) > MAX_METRICS:
        raise RejectedReply(f"reply has {len(metrics)} metrics; at most {MAX_METRICS}")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise RejectedReply(f"metric '{str(key)[:80]}' is {str(value)[:40]}; expected a "
                                "finite number")


def expected_shapes(module_shapes: Mapping[str, tuple[int, int]],
                    r: int) -> dict[str, tuple[int, int]]:
    """{peft key: shape} of a rank-r adapter over modules of shape (out, in)."""
    shapes: dict[str, tuple[int, int]] = {}
    for module, (out_features, in_features) in module_shapes.items():
        shapes[module + LORA_A] = (r, in_features)
        shapes[module + LORA_B] = (out_features, r)
    return shapes


def parse_reply(content: RecordDict, module_shapes: Mapping[str, tuple[int, int]], r: int,
                scaling: float, weight_key: str = "num-examples",
                fixed_a: Mapping[str, torch.Tensor] | None = None) -> LoraUpdate:
    """Validate a train reply against the rank-r adapter that was asked for.

    With `fixed_a` ({module: lora_A}, FFA-LoRA) the reply must hold lora_B only, and the
    update is completed with the server's A. Raises RejectedReply with the reason.
    """
    weight = reply_weight(content, weight_key)
    wanted = expected_shapes(module_shapes, r)
    if fixed_a is not None:
        wanted = {k: v for k, v in wanted.items() if k.endswith(LORA_B)}
    state = read_arrays(content.array_records[ARRAYS], wanted, f"rank-{r} adapter")
    if fixed_a is not None:
        state = {**state, **{m + LORA_A: a for m, a in fixed_a.items()}}
    return LoraUpdate(factors=split_factors(state), scaling=scaling, weight=weight)


def reply_weight(content: RecordDict, weight_key: str = "num-examples") -> float:
    """A reply's aggregation weight, once its records and metrics pass their checks: an
    ArrayRecord and a MetricRecord, a positive `weight_key`, a time >= 0, finite metrics."""
    if ARRAYS not in content.array_records:
        raise RejectedReply(f"reply has no ArrayRecord '{ARRAYS}'")
    if METRICS not in content.metric_records:
        raise RejectedReply(f"reply has no MetricRecord '{METRICS}'")
    metrics = content.metric_records[METRICS]
    weight = metrics.get(weight_key)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise RejectedReply(f"metric '{weight_key}' is {weight!r}; expected a positive number")
    seconds = metrics.get("train-seconds", 0.0)
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise RejectedReply(f"metric 'train-seconds' is {seconds!r}; expected a time >= 0")
    check_metrics(content)
    return float(weight)
