"""FLoRA: exact aggregation of heterogeneous-rank LoRA by stacking.

Each round's update Δ_t = Σ p_k s_k B_k A_k is stacked into low-rank factors (exact for any
mix of ranks) and appended to the server-held global update G, kept as factors of rank R.
Selected clients receive G and train a fresh LoRA beside it (G stays frozen, the 4-bit base
is never requantised). Past `rank_budget`, G is re-compressed by a truncated SVD and the
relative error dropped is logged.

The downlink is versioned and exact. Version t is the global after round t (0: none):
G_t = `next_global`(G_{t-1}, Δ_t, budget), from the wire-precision uploads, held at wire
precision, so what the server evaluates is what every client holds. A client accepted in
round t holds G_{t-1} and its own upload of round t; selected in round t+1, it gets only
the other clients' slots of Δ_t (an `Increment`: their uploads side by side, every slot's
rank and coefficient p_j s_j, where its own slot goes) and recomputes G_t with the same
function (`receive_global`), unless all of G_t is smaller (Σ_{j≠k} r_j ≥ R). Everyone
else (newcomers, clients that missed round t or were not accepted in it, the first round of
a resumed run or of a retried attempt) gets all of G_t; so does everybody under DP, whose
Δ_t is noised and has no own part. A client that
cannot apply an increment fails with NO_GLOBAL; not accepted, it gets all of G next time.

With `downlink_cap` = c, a client whose copy the server knows (its last message was
answered and accepted) and whose exact form (increment or all of G) would make its train
message larger than c times its last upload gets a `Correction` instead: the best rank-m
approximation of G_t − H, H being its copy, with m as large as the cap allows
(`strategies.downlink_math`); where none fits or none is smaller, the exact form goes.
Both sides then hold H' = `next_global`(H, C, budget) (bitwise alike on one platform; on
another, alike to rounding, which the next correction absorbs); what was left out is part
of the next correction (error feedback). The server records each client's lag
‖G_t − H'‖ / ‖G_t‖ in its metrics, evaluates G_t and keeps each client's copy (one rank-R
set of factors per client); the clients train beside H'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from strategies.base import ClientIdentity, LoraStrategy, config_bytes
from strategies.downlink_math import correction, correction_rank, lag, per_rank_bytes
from strategies.dp import make_accountant, private_aggregate, spend
from strategies.global_version import Correction, GlobalVersion, Increment
from strategies.lora_math import (
    Factors,
    LoraUpdate,
    WireStack,
    cat_slots,
    digest,
    join_factors,
    next_global,
    rank_of,
    scaled_parts,
    split_factors,
    split_slots,
    wire_stack,
)
from strategies.pipe_math import decode_slots, slots_delta
from strategies.protocol import NO_GLOBAL, TrainOrder
from strategies.summary import ClientOutcome


@dataclass(frozen=True)
class Copy:
    """The copy of the global a client holds, as the server knows it: made by its train
    message of global version `version`, equal to G_version when `exact` (else a corrected
    approximation); its factors (kept only with a downlink cap, for the next correction),
    the bytes of the client's last accepted upload (what the cap scales) and its lag."""

    version: int
    exact: bool
    factors: Factors | None = None
    upload_bytes: int = 0
    lag: float = 0.0  # ‖G − H‖ / ‖G‖ when it was sent


@dataclass(frozen=True)
class RoundSlots:
    """Round `server_round`'s Δ as slots: the accepted clients' uploads (wire dtype) in
    stacking order, with their names and coefficients p_k s_k."""

    server_round: int
    names: list[str]
    parts: list[tuple[float, Factors]]

    def increment_for(self, name: str, rank_budget: int) -> tuple[ArrayRecord, Increment]:
        """What a client that uploaded slot `name` needs to rebuild this round's global."""
        own = self.names.index(name)
        others = cat_slots([f for j, (_, f) in enumerate(self.parts) if j != own])
        return ArrayRecord(join_factors(others)), Increment(
            rank_budget=rank_budget, ranks=tuple(rank_of(f) for _, f in self.parts),
            coefficients=tuple(c for c, _ in self.parts), own_slot=own,
            own_digest=digest(join_factors(self.parts[own][1])))


class FLoRA(LoraStrategy):
    name = "flora"
    global_mode = "frozen"  # clients keep G = B @ A (scaling 1) frozen beside the base
    supports_dp = True
    increments = True  # returning clients get the round's increment (False: always all of G)
    cappable = True  # whether `downlink_cap` applies (the client holds all of G as factors)

    def __init__(self, *args, rank_budget: int = 64, dp: Mapping | None = None,
                 downlink_cap: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if downlink_cap is not None and (isinstance(downlink_cap, bool) or not isinstance(
                downlink_cap, int | float) or not 0 < downlink_cap < float("inf")):
            raise ValueError(f"strategy.downlink_cap={downlink_cap}; allowed: null (every "
                             "client gets the exact global) or a number > 0 (a returning "
                             "client's train message at most this many times its last upload)")
        if downlink_cap is not None and not self.cappable:
            raise ValueError(f"strategy.downlink_cap={downlink_cap} with strategy {self.name}, "
                             "whose clients do not hold the global as FLoRA's do; allowed: null")
        self.downlink_cap = None if downlink_cap is None else float(downlink_cap)
        if isinstance(rank_budget, bool) or not isinstance(rank_budget, int) or rank_budget <= 0:
            raise ValueError(f"strategy.rank_budget={rank_budget}; allowed: a positive integer")
        if self.ranks and rank_budget < max(self.ranks):
            raise ValueError(f"strategy.rank_budget={rank_budget} is below the largest client "
                             f"rank {max(self.ranks)}: the global could not hold even one "
                             f"client's update exactly; allowed: >= {max(self.ranks)}")
        self.rank_budget = rank_budget
        self.global_factors: Factors = {}
        self.dp = dict(dp) if dp else None
        self.accountant = make_accountant(self.dp, self.min_available_nodes) if self.dp else None
        self.slots: RoundSlots | None = None  # the last round's Δ, for returning clients
        self.owners: dict[int, str] = {}  # id(accepted update) -> client name, this round
        self.copies: dict[str, Copy] = {}  # per client, what it holds (as of its last reply)
        self.sending: dict[str, Copy] = {}  # per client, what its message of this round gives

    def load_state(self, state: dict, arrays: ArrayRecord) -> None:
        dtype = self.held_dtype()  # a checkpoint of an older version may hold fp32
        self.global_factors = {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in
                               split_factors(arrays.to_torch_state_dict()).items()}
        self.slots = None  # a resumed run or a retried attempt: everyone gets all of G
        self.copies, self.sending = {}, {}
        if self.accountant is not None and state.get("accountant"):
            self.accountant.load_state_dict(state["accountant"])

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict()} if self.accountant else {}

    # ------------------------------------------------------------------ downlink
    def downlink(self, server_round: int, client: ClientIdentity, state: dict[str, torch.Tensor],
                 order: TrainOrder) -> tuple[ArrayRecord, ConfigRecord | None]:
        """The cheapest exact form of version `server_round` − 1 for this client (all of G,
        or the increment of the previous round for a client that uploaded one of its slots
        and holds the version before exactly); with `downlink_cap`, a correction of the copy
        a client holds when the exact form would make the message exceed the cap."""
        if not self.increments or self.dp is not None:  # DP: Δ is noised, no own slots
            return super().downlink(server_round, client, state, order)
        version, copy = server_round - 1, self.known_copy(client)
        exact = self.client_arrays(client, state), GlobalVersion(version)
        slots = self.slots
        if (slots is not None and slots.server_round == version and copy is not None
                and copy.exact and copy.version == version - 1
                and slots.names.count(client.name) == 1):
            arrays, increment = slots.increment_for(client.name, self.rank_budget)
            if arrays.count_bytes() < exact[0].count_bytes():  # else all of G is cheaper
                exact = arrays, GlobalVersion(version, increment)
        if copy is not None and copy.factors is not None:  # a cap, and a copy it knows
            limit = self.downlink_cap * copy.upload_bytes - config_bytes(order.to_config())
            exact_bytes = exact[0].count_bytes() + config_bytes(exact[1].to_config())
            if exact_bytes > limit and (capped := self.corrected(
                    version, copy, limit, exact_bytes)) is not None:
                arrays, record, self.sending[client.name] = capped
                return arrays, record.to_config()
        self.sending[client.name] = Copy(version, True, self.global_factors
                                         if self.downlink_cap is not None else None)
        return exact[0], exact[1].to_config()

    def known_copy(self, client: ClientIdentity) -> Copy | None:
        """The copy `client` holds, unless that is unknown: its last message got no reply
        (it may or may not have taken it) or its node is new or restarted (empty state)."""
        if client.name in self.sending or any(self.identities.get(n) == client
                                              for n in self.setup_owed):
            self.copies.pop(client.name, None)
        return self.copies.get(client.name)

    def corrected(self, version: int, copy: Copy, limit: float, exact_bytes: int
                  ) -> tuple[ArrayRecord, GlobalVersion, Copy] | None:
        """A correction of `copy` towards G (version `version`) whose arrays fit in `limit`
        bytes and are smaller than the exact form's; None if there is none."""
        target, dtype, held = self.global_factors, self.held_dtype(), copy.factors or {}
        record = GlobalVersion(version, correction=Correction(self.rank_budget, copy.version))
        limit = min(limit, exact_bytes - 1) - config_bytes(record.to_config())
        if not target:
            return None
        rank = correction_rank(limit, per_rank_bytes(target, dtype))
        while rank > 0:
            factors = correction(target, held, rank, dtype)
            arrays = ArrayRecord(join_factors(factors))
            if arrays.count_bytes() <= limit:
                break
            rank -= 1  # the keys' bytes did not fit beside the values
        else:
            return None
        rebuilt, _ = next_global(held, factors, self.rank_budget, dtype)
        return arrays, record, Copy(version, False, rebuilt, lag=lag(target, rebuilt))

    def check_reply(self, server_round: int, node_id: int, msg: Message
                    ) -> tuple[str, ClientOutcome, LoraUpdate | None]:
        """As every strategy's; and what the client now holds, for the next downlink: what
        this round's message gave it if its reply is accepted, unknown otherwise."""
        name, outcome, update = super().check_reply(server_round, node_id, msg)
        sent = self.sending.pop(name, None)
        if update is not None:  # whose slot it becomes, for the next round's increments
            self.owners[id(update)] = name
        if update is None or sent is None:  # unknown: all of G next time
            self.copies.pop(name, None)
            return name, outcome, update
        self.copies[name] = replace(sent, upload_bytes=outcome.bytes_up or 0)
        if self.downlink_cap is not None:
            outcome.extra["downlink-lag"] = sent.lag
        return name, outcome, update

    # ------------------------------------------------------------------ aggregation
    def held_dtype(self) -> torch.dtype:
        """G's dtype on the server: the wire dtype, so that clients rebuilding it hold the
        same bits and the server evaluates what they hold; float32 without increments
        (FedSpine, whose clients get G cast to the wire dtype)."""
        return getattr(torch, self.setup.wire_dtype) if self.increments else torch.float32

    def round_update(self, server_round: int, updates: list[LoraUpdate]
                     ) -> tuple[Factors | WireStack, dict[str, float],
                                list[tuple[float, Factors]] | None]:
        """This round's Δ (factors, or the stack at wire precision), its figures, and its slots (wire dtype; None under DP:
        its differentially private version has no per-client parts)."""
        if self.dp is None:
            parts = scaled_parts(updates, self.held_dtype())
            return wire_stack(parts), {}, parts
        generator = torch.Generator().manual_seed(self.seed * 7919 + server_round)
        factors, info = private_aggregate(updates, float(self.dp["clip_norm"]),
                                          float(self.dp["noise_multiplier"]), self.rank_budget,
                                          generator)
        info["dp-epsilon"] = spend(self.accountant, float(self.dp["noise_multiplier"]),
                                   len(updates), float(self.dp["delta"]))
        return factors, info, None

    def aggregate_updates(self, server_round: int, updates: list[LoraUpdate]
                          ) -> tuple[ArrayRecord, dict[str, float]]:
        delta, info, parts = self.round_update(server_round, updates)
        self.global_factors, dropped = next_global(self.global_factors, delta, self.rank_budget,
                                                   self.held_dtype())
        names = [self.owners.get(id(u)) for u in updates]
        self.owners = {}
        self.slots = None
        if self.increments and parts is not None and None not in names:
            self.slots = RoundSlots(server_round, names, parts)  # type: ignore[arg-type]
        return ArrayRecord(join_factors(self.global_factors)), {
            "global-rank": float(rank_of(self.global_factors)), "svd-dropped-error": dropped,
            **info}

    def global_adapter(self, arrays: ArrayRecord) -> tuple[dict[str, torch.Tensor], int, float]:
        state = arrays.to_torch_state_dict()
        if not state:
            return {}, 0, 0.0
        rank = rank_of(split_factors(state))
        return state, rank, float(rank)  # lora_alpha = R: scaling 1, G = B @ A exactly


def receive_global(version: GlobalVersion, arrays: Mapping[str, torch.Tensor],
                   held: Mapping[str, torch.Tensor] | None, held_version: int | None,
                   upload: Mapping[str, torch.Tensor] | None,
                   dtype: torch.dtype, held_exact: bool = True) -> dict[str, torch.Tensor]:
    """The client's side of the downlink: global version `version.version` (or, for a
    correction, an approximation of it) as peft-keyed factors, from the message's `arrays`
    (all of it, an increment or a correction) and, for an increment, the client's held
    global (`held`, version `held_version`, exact unless `held_exact` is false) and its last
    `upload`; for a correction, the held copy. Raises RuntimeError with NO_GLOBAL when the
    arrays do not follow what it holds; the server then sends all of G next time."""
    inc = version.increment
    if version.correction is not None:
        return corrected_global(version, arrays, held, held_version, dtype)
    if inc is None:
        return dict(arrays)
    if not held_exact:
        raise RuntimeError(f"{NO_GLOBAL}: the increment to global version {version.version} "
                           "needs an exact copy of the version before; this node holds a "
                           "corrected one; the server sends the whole global next time")
    if held is None or held_version != version.version - 1:
        raise RuntimeError(f"{NO_GLOBAL}: the increment to global version {version.version} "
                           f"needs version {version.version - 1}; this node holds "
                           f"{'none' if held is None else held_version} (a restarted "
                           "SuperNode?); the server sends the whole global next time")
    if upload is None or digest({k: v.to(dtype) for k, v in upload.items()}) != inc.own_digest:
        raise RuntimeError(f"{NO_GLOBAL}: the increment to global version {version.version} "
                           "builds on an upload of this node's that it does not hold; the "
                           "server sends the whole global next time")
    own = {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in split_factors(upload).items()}
    if inc.per_module:  # FedPipe: slots of different modules (strategies.pipe_math)
        slots = decode_slots(arrays, len(inc.ranks), inc.own_slot, own)
        base, delta = slots_delta(slots, inc.coefficients, inc.scaling, split_factors(held))
        return join_factors(next_global(base, delta, inc.rank_budget, dtype)[0])
    others, other_ranks = split_factors(arrays), [r for j, r in enumerate(inc.ranks)
                                                  if j != inc.own_slot]
    if sorted(others) != (sorted(own) if other_ranks else []):
        raise ValueError(f"the increment to global version {version.version} covers "
                         f"{len(others)} modules; expected the {len(own)} of this node's "
                         f"upload ({len(other_ranks)} other slots)")
    slots = split_slots(others, other_ranks)
    slots.insert(inc.own_slot, own)
    delta = wire_stack(list(zip(inc.coefficients, slots, strict=True)))
    factors, _ = next_global(split_factors(held), delta, inc.rank_budget, dtype)
    return join_factors(factors)


def corrected_global(version: GlobalVersion, arrays: Mapping[str, torch.Tensor],
                     held: Mapping[str, torch.Tensor] | None, held_version: int | None,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The client's side of a `Correction`: `next_global`(held, C, budget), which the server
    computes alike. Raises RuntimeError with NO_GLOBAL unless this node holds the copy the
    correction was made for: the one its message of version `held_version` gave it."""
    fix = version.correction
    assert fix is not None
    if held is None or held_version != fix.held_version:
        raise RuntimeError(f"{NO_GLOBAL}: the correction towards global version "
                           f"{version.version} is for the copy of version {fix.held_version}; "
                           f"this node holds {'none' if held is None else held_version} (a "
                           "lost reply or a restarted SuperNode?); the server sends the whole "
                           "global next time")
    base, delta = split_factors(held), split_factors(arrays)
    if base and sorted(delta) != sorted(base):  # an empty copy: version 0, nothing yet
        raise RuntimeError(f"{NO_GLOBAL}: the correction towards global version "
                           f"{version.version} covers {len(delta)} modules; this node's copy "
                           f"has {len(base)}; the server sends the whole global next time")
    factors, _ = next_global(base, delta, fix.rank_budget, dtype)
    return join_factors(factors)
