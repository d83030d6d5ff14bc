"""What one round did, as typed records: per client (status, bytes, metrics, completion
time) and for the round (accepted replies, traffic, train loss, the strategy's figures).

The strategy fills a `RoundSummary` in `aggregate_train`; the server's recorder turns it into
one line of `metrics.jsonl` (`to_json`, kebab-case keys as on the wire).
"""

from __future__ import annotations

from dataclasses import dataclass, field

OK, NO_REPLY = "ok", "no reply"


@dataclass
class ClientOutcome:
    """One selected client's round, as the server saw it."""

    bytes_down: int = 0
    status: str = NO_REPLY  # "ok", "no reply" or "rejected: <reason>"
    bytes_up: int | None = None
    r: int | None = None  # the rank it was asked to train
    metrics: dict[str, float] = field(default_factory=dict)  # as the client reported them
    device: str | None = None
    completion_seconds: float | None = None  # its device's time (strategies.devices)
    extra: dict[str, float] = field(default_factory=dict)  # the strategy's (arm, reward, ...)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict:
        """The client's metrics, then the server's own fields (which a client cannot
        overwrite by reporting a metric of the same name), then the strategy's."""
        row: dict = {**self.metrics, "bytes-down": self.bytes_down}
        if self.bytes_up is not None:
            row["bytes-up"] = self.bytes_up
        row["status"] = self.status
        if self.r is not None:
            row["r"] = self.r
        if self.device is not None:
            row["device"] = self.device
        if self.completion_seconds is not None:
            row["completion-seconds"] = self.completion_seconds
        return {**row, **self.extra}

    def console_line(self, name: str, r: int | None, steps: int | None) -> str:
        """One readable line of the round log: the client, what it was asked (rank `r`,
        `steps` optimizer steps), how it went (train loss, seconds per step, peak RSS of its
        process and the malloc it ran on, from its metrics), and the traffic both ways."""
        asked = f"r={r if r is not None else '-'}, {steps if steps is not None else '-'} steps"
        traffic = f"down {self.bytes_down / 2**20:.3f} MB, up {(self.bytes_up or 0) / 2**20:.3f} MB"
        if not self.ok:
            return f"{name}: {self.status}, {asked}, {traffic}"
        m = self.metrics
        # a pruning round also times its probes and slicing: seconds per step are the tuning's
        seconds = m.get("tune-seconds", m.get("train-seconds"))
        loss = f"{m['train-loss']:.4f}" if "train-loss" in m else "-"
        per_step = f"{seconds / steps:.2f}" if seconds is not None and steps else "-"
        rss = f"{m['peak-rss-mb']:.0f}" if "peak-rss-mb" in m else "-"
        malloc = {1.0: " (jemalloc)", 0.0: " (system malloc)"}.get(m.get("jemalloc"), "")
        return (f"{name}: {asked}, train-loss {loss}, {per_step} s/step, "
                f"peak RSS {rss} MiB{malloc}, {traffic}")


@dataclass
class RoundSummary:
    """Every selected client's outcome, the example-weighted train loss of the accepted
    ones, and the strategy's own figures (global rank, dropped SVD error, ...)."""

    server_round: int
    clients: dict[str, ClientOutcome] = field(default_factory=dict)
    train_loss: float | None = None
    figures: dict[str, float] = field(default_factory=dict)
    attempts: int = 1  # the round's attempts: more than 1 when too few replies came

    @property
    def accepted(self) -> int:
        return sum(c.ok for c in self.clients.values())

    @property
    def bytes_up(self) -> int:
        return sum(c.bytes_up or 0 for c in self.clients.values())

    @property
    def bytes_down(self) -> int:
        return sum(c.bytes_down for c in self.clients.values())

    @property
    def sim_seconds(self) -> float:
        """Clients train in parallel: the round lasts as long as its slowest accepted client."""
        return max((c.completion_seconds or 0.0 for c in self.clients.values() if c.ok),
                   default=0.0)

    def to_json(self) -> dict:
        row = {"clients": {name: c.to_json() for name, c in sorted(self.clients.items())},
               "accepted": self.accepted, "attempts": self.attempts}
        if self.train_loss is not None:
            row["train-loss"] = self.train_loss
        return {**row, **self.figures}
