"""A pruned device's structure on the server (protocol.UNITS): checked as it comes back in a
reply, kept as JSON-able lists, sent back with the device's next order.

A device only ever prunes further, so a reply's structure must keep every block the device
had pruned before, each with a subset of the units it had kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import pairwise

import torch
from flwr.app import ArrayRecord, RecordDict

from strategies.protocol import UNITS
from strategies.replies import INDEX_DTYPES, RejectedReply, read_arrays

UnitLists = dict[str, list[int]]
UNIT_KEY = re.compile(r"^\d+\.(self_attn|mlp)$")
MAX_INDEX = 1 << 24  # no layer has this many KV groups or channels
MAX_UNITS = 1 << 20  # nor keeps this many
MAX_BLOCKS = 4096  # attention + MLP blocks of a 2048-layer model


def read_units(content: RecordDict, previous: Mapping[str, list[int]]) -> UnitLists:
    """The structure a reply says its device reached; RejectedReply naming what is wrong."""
    if UNITS not in content.array_records:
        if previous:
            raise RejectedReply(f"reply lacks its '{UNITS}' record, but the device was "
                                f"pruned before ({len(previous)} blocks)")
        return {}
    units: UnitLists = {}
    record = content.array_records[UNITS]
    for key in record:
        if not UNIT_KEY.match(key):
            raise RejectedReply(f"'{UNITS}' record holds '{str(key)[:120]}'; allowed: "
                                "'<layer>.self_attn' and '<layer>.mlp'")
    if len(record) > MAX_BLOCKS:
        raise RejectedReply(f"'{UNITS}' record holds {len(record)} blocks; at most "
                            f"{MAX_BLOCKS}")
    wanted = dict.fromkeys(record, MAX_UNITS)
    for key, array in read_arrays(record, wanted, f"'{UNITS}' record", INDEX_DTYPES).items():
        kept = array.tolist()
        if any(not 0 <= k < MAX_INDEX for k in kept) or any(
                a >= b for a, b in pairwise(kept)):
            raise RejectedReply(f"'{UNITS}' {key}: kept indices must be sorted, unique and "
                                "non-negative")
        if key in previous and not set(kept) <= set(previous[key]):
            raise RejectedReply(f"'{UNITS}' {key} keeps units the device had pruned before; "
                                "allowed: a subset of what it kept")
        units[key] = kept
    if lost := sorted(set(previous) - set(units)):
        raise RejectedReply(f"'{UNITS}' record un-prunes {lost[:3]}; a device only prunes "
                            "further")
    return units


def units_record(units: Mapping[str, list[int]]) -> ArrayRecord:
    """The structure as the ArrayRecord a train message carries."""
    return ArrayRecord({k: torch.tensor(v, dtype=torch.long) for k, v in units.items()})
