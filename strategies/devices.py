"""Device profiles of a heterogeneous federation, and a client's completion time.

A scenario may list device classes (a phone, a laptop, an edge box), each with a compute
slow-down relative to the machine that actually runs the client, a memory budget and its
up/down link, and assign them to clients (cycled over partition ids). A client's completion
time in a round is then

    T = compute seconds measured on this machine × slowdown + bytes up / up-link
        + bytes down / down-link

which is what a real device of that class would have taken, as far as compute scales
linearly. Without device classes (a real deployment), every client is its own device:
slowdown 1 and the scenario's default links, so T is its measured compute plus transfer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    slowdown: float = 1.0  # compute time on this device / compute time measured here
    memory_mb: float = math.inf  # training memory budget; arms above it are never played
    up_mbps: float = 20.0
    down_mbps: float = 100.0
    # the share of prunable parameters its deployed model drops (FedSpine); None: the least
    # its memory budget needs
    sparsity: float | None = None

    def __post_init__(self) -> None:
        for key in ("slowdown", "memory_mb", "up_mbps", "down_mbps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"scenario.devices.{self.name}.{key}={value!r}; allowed: a "
                                 f"number > 0")
        s = self.sparsity
        if s is not None and (isinstance(s, bool) or not isinstance(s, int | float)
                              or not 0 <= s < 1):
            raise ValueError(f"scenario.devices.{self.name}.sparsity={s!r}; allowed: a "
                             "number in [0, 1), or null for the least its memory budget needs")

    def completion_seconds(self, compute_seconds: float, bytes_up: float,
                           bytes_down: float) -> float:
        """compute × slowdown + bytes up / up-link + bytes down / down-link (seconds)."""
        return (compute_seconds * self.slowdown + bytes_up * 8 / (self.up_mbps * 1e6)
                + bytes_down * 8 / (self.down_mbps * 1e6))


def device_profiles(devices: Mapping[str, Mapping] | None, device_of_client: Sequence[str],
                    up_mbps: float, down_mbps: float) -> list[DeviceProfile]:
    """Profiles per partition id (cycled), from a scenario's `devices` and `device_of_client`.

    Without `devices` every client gets the default device: slowdown 1, no memory limit,
    the scenario's links. Raises ValueError naming a missing class or a bad value.
    """
    default = DeviceProfile("default", up_mbps=float(up_mbps), down_mbps=float(down_mbps))
    if not devices:
        if device_of_client:
            raise ValueError(f"scenario.device_of_client={list(device_of_client)} but "
                             "scenario.devices defines no device class")
        return [default]
    known = {}
    for name, spec in devices.items():
        unknown = sorted(set(spec) - {"slowdown", "memory_mb", "up_mbps", "down_mbps",
                                      "sparsity"})
        if unknown:
            raise ValueError(f"scenario.devices.{name} has unknown keys {unknown}; allowed: "
                             "slowdown, memory_mb, up_mbps, down_mbps, sparsity")
        spec = {k: v for k, v in spec.items() if not (k == "sparsity" and v is None)}
        for key, value in spec.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(  # noqa: TRY004 - config errors are ValueErrors here
                    f"scenario.devices.{name}.{key}={value!r}; allowed: a number "
                    f"{'in [0, 1)' if key == 'sparsity' else '> 0'}")
        known[name] = DeviceProfile(str(name), **{k: float(v) for k, v in spec.items()})
    if not device_of_client:
        raise ValueError(f"scenario.devices is set but scenario.device_of_client is empty; "
                         f"allowed: a list of device classes from {sorted(known)}")
    missing = sorted({d for d in device_of_client if d not in known})
    if missing:
        raise ValueError(f"scenario.device_of_client names {missing}; allowed: {sorted(known)}")
    return [known[d] for d in device_of_client]
