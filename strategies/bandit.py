"""FedSpine's per-client bandit over (prune ratio, LoRA rank) (Yao et al., 2025).

Each client has its own bandit, because what pays off depends on the device (a phone wants
a high prune ratio and a low rank, an edge server the opposite) and on its data. The server
asks it for an arm when the client is selected and tells it the reward when the reply
arrives. Everything here is plain Python, JSON-serialisable and deterministic (no RNG), so a
resumed run continues with identical statistics and identical choices.

**Arms.** An `Arm` is (prune_ratio, rank). The grid starts as ratios × ranks
(default {0, 0.25, 0.5} × {4, 8, 16}) and is refined progressively: once the best arm
(highest smoothed mean) has `refine_after` pulls, `refine()` adds its four axis
neighbours: the midpoints towards the nearest grid ratio and rank on either side (beyond
the grid's edges: towards 0 or `max_prune_ratio`, 2·rank capped at `max_rank`, or rank // 2;
ranks rounded to ints, never below 1). Each arm is
refined around at most once, ratios closer than `min_ratio_step` are not added, and the grid
never exceeds `max_arms`.

**Smoothed UCB.** Rewards are non-stationary: the global model improves every round, so
every arm's loss improvement shrinks over a run, and a reward seen in round 3 says little
about round 30. Each arm's mean is therefore exponentially smoothed, with the running average
as a warm start so that early pulls are not dominated by the first one:

    μ_i ← μ_i + max(1 / n_i, α) · (r − μ_i)        (n_i = pulls of i, α = `smoothing`)

and the choice is UCB1 on those means, the bonus counting this bandit's own pulls (a
device that is sampled rarely explores as much per pull as one sampled every round):

    UCB_i = μ_i + c · sqrt( ln(max(N, e)) / n_i )   (N = Σ_j n_j, c = `exploration`)

An arm with at least 2 pulls whose UCB is below the best lower bound μ_j − c·sqrt(ln N /
n_j) of another arm with at least 2 pulls is dominated: it is not played again (until the
means move).

Why not discount the pull counts as well (discounted UCB)? Their decaying counts force every
arm to be re-explored at a rate ∝ (1 − γ)·c²/gap², which with a dozen arms and a run of a few
dozen rounds leaves little exploitation; the dominant drift here (everyone's improvement
shrinking together) keeps the arms' order, which smoothed means track without re-exploring,
and a stale optimistic mean gets re-tested as soon as the tracked arms drift below it.
`select(feasible)` returns, among arms that pass the `feasible` predicate, the first
never-played arm in grid order, else argmax UCB among the undominated (ties: the larger
rank, then grid order).
`select(feasible, prior)` scores never-played arms by a predicted reward instead
(`strategies.spine_prior`: a cost model of the device's round time), with the bonus of
`prior_pulls` pulls, so they compete with the played ones rather than going first; equal
scores then go to the larger rank (before any measurement every arm that reaches the
device's target ties, and the largest rank its memory allows learns the most per step; a
cheaper rank plays when its predicted or measured reward is higher). An
infeasible arm is never returned; with no feasible arm it raises ValueError.

**Reward.** What an arm earned is `strategies.spine_reward`'s: its gain per unit of time,
optionally relative to its round.

**Memory.** Which arms a device can hold is `strategies.spine_memory`'s estimate, passed to
`select` as the `feasible` predicate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

Feasible = Callable[["Arm"], bool]


@dataclass(frozen=True)
class Arm:
    """One configuration a client can be told to train with."""

    prune_ratio: float
    rank: int

    def __post_init__(self) -> None:
        if not (isinstance(self.prune_ratio, int | float) and 0.0 <= self.prune_ratio < 1.0):
            raise ValueError(f"Arm.prune_ratio={self.prune_ratio!r}; allowed: 0 <= ratio < 1")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"Arm.rank={self.rank!r}; allowed: an int > 0")
        object.__setattr__(self, "prune_ratio", float(self.prune_ratio))


@dataclass
class ArmStats:
    """What one arm has earned: its pulls n_i and its smoothed mean reward μ_i."""

    pulls: int = 0
    mean: float = 0.0
    refined: bool = False  # neighbours already added around this arm


@dataclass(frozen=True)
class BanditConfig:
    """The grid and the knobs of every client's bandit (one config for the whole bank)."""

    prune_ratios: tuple[float, ...] = field(
        default=(0.0, 0.25, 0.5), metadata={"help": "initial grid of prune ratios, in [0, 1)"})
    ranks: tuple[int, ...] = field(
        default=(4, 8, 16), metadata={"help": "initial grid of LoRA ranks, ints > 0"})
    exploration: float = field(
        default=0.1, metadata={"help": "c in the UCB bonus, on the rewards' scale (~0.1-1)"})
    smoothing: float = field(
        default=0.2, metadata={"help": "α, the floor of the mean's step: 0 = plain average"})
    refine_after: int = field(
        default=3, metadata={"help": "pulls the best arm needs before refining around it"})
    max_arms: int = field(default=24, metadata={"help": "cap on the grid size"})
    max_rank: int = field(default=64, metadata={"help": "refinement never goes above it"})
    max_prune_ratio: float = field(
        default=0.75, metadata={"help": "refinement never goes above it, < 1"})
    min_ratio_step: float = field(
        default=0.02, metadata={"help": "no new ratio closer than this to an existing one"})
    prior_pulls: float = field(
        default=1.0, metadata={"help": "pulls an unplayed arm's predicted reward counts as "
                               "(its UCB bonus); 0: unplayed arms go first, in grid order"})
    fixed_step_share: float = field(
        default=0.56, metadata={"help": "the part of a step pruning does not shrink, in the "
                                "prior's cost model (strategies.spine_prior)"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "prune_ratios", tuple(float(x) for x in self.prune_ratios))
        object.__setattr__(self, "ranks", tuple(self.ranks))
        checks = [
            ("prune_ratios", self.prune_ratios,
             bool(self.prune_ratios) and all(0 <= x < 1 for x in self.prune_ratios),
             "a non-empty list of ratios in [0, 1)"),
            ("ranks", self.ranks, bool(self.ranks) and all(
                isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in self.ranks),
             "a non-empty list of ints > 0"),
            ("exploration", self.exploration, self.exploration >= 0, ">= 0"),
            ("smoothing", self.smoothing, 0 <= self.smoothing <= 1, "0 <= α <= 1"),
            ("refine_after", self.refine_after, self.refine_after >= 1, "an int >= 1"),
            ("max_arms", self.max_arms, self.max_arms >= len(self.prune_ratios) * len(self.ranks),
             f">= the initial grid size {len(self.prune_ratios) * len(self.ranks)}"),
            ("max_rank", self.max_rank, self.max_rank >= max(self.ranks, default=1),
             "an int >= every initial rank"),
            ("max_prune_ratio", self.max_prune_ratio,
             max(self.prune_ratios, default=0.0) <= self.max_prune_ratio < 1,
             "every initial ratio <= x < 1"),
            ("min_ratio_step", self.min_ratio_step, self.min_ratio_step > 0, "> 0"),
            ("prior_pulls", self.prior_pulls, self.prior_pulls >= 0, ">= 0"),
            ("fixed_step_share", self.fixed_step_share, 0 <= self.fixed_step_share <= 1,
             "0 <= κ <= 1"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"bandit.{name}={value!r}; allowed: {allowed}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> BanditConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class ClientBandit:
    """Smoothed UCB over a progressively refined (prune_ratio, rank) grid, for one client."""

    def __init__(self, config: BanditConfig | None = None) -> None:
        self.config = config or BanditConfig()
        self.stats: dict[Arm, ArmStats] = {
            Arm(p, r): ArmStats() for p in self.config.prune_ratios for r in self.config.ranks}

    @property
    def arms(self) -> list[Arm]:
        """The grid, in the order used for first plays and for ties."""
        return list(self.stats)

    def bonus(self, arm: Arm) -> float:
        """c · sqrt(ln(max(N, e)) / n_i) of a played arm, N = this bandit's pulls."""
        pulls = sum(s.pulls for s in self.stats.values())
        return self.config.exploration * math.sqrt(math.log(max(pulls, math.e))
                                                   / self.stats[arm].pulls)

    def scores(self) -> dict[Arm, float]:
        """UCB_i of every played arm (unplayed arms are not scored: they go first)."""
        return {a: s.mean + self.bonus(a) for a, s in self.stats.items() if s.pulls > 0}

    def dominated(self, arms: list[Arm]) -> set[Arm]:
        """Arms of `arms` (2+ pulls) whose UCB is below another's (2+ pulls) lower bound."""
        tried = [a for a in arms if self.stats[a].pulls >= 2]
        if len(tried) < 2:
            return set()
        ucb = {a: self.stats[a].mean + self.bonus(a) for a in tried}
        lcb = {a: self.stats[a].mean - self.bonus(a) for a in tried}
        return {a for a in tried if any(lcb[b] > ucb[a] for b in tried if b != a)}

    def select(self, feasible: Feasible | None = None,
               prior: Callable[[Arm], float] | None = None) -> Arm:
        """The arm to play: without `prior` (or with `prior_pulls` 0), the first unplayed
        feasible arm, else the best UCB among the feasible arms that are not dominated. With
        `prior` (a predicted reward per arm, `strategies.spine_prior`), an unplayed arm
        competes from the start: scored prior(arm) + c · sqrt(ln(max(N, e)) / prior_pulls);
        of equal scores, the larger rank.

        Raises ValueError when no arm of the grid is feasible.
        """
        allowed = [a for a in self.stats if feasible is None or feasible(a)]
        if not allowed:
            raise ValueError(f"no arm of the {len(self.stats)}-arm grid is feasible (smallest: "
                             f"{min(self.stats, key=lambda a: (a.rank, -a.prune_ratio))}); "
                             f"raise the device's memory budget or add higher prune ratios / "
                             f"lower ranks to the grid")
        unplayed = [a for a in allowed if self.stats[a].pulls == 0]
        if unplayed and (prior is None or not self.config.prior_pulls):
            return unplayed[0]
        scores, beaten = self.scores(), self.dominated(allowed)
        if unplayed:
            pulls = sum(s.pulls for s in self.stats.values())
            bonus = self.config.exploration * math.sqrt(math.log(max(pulls, math.e))
                                                        / self.config.prior_pulls)
            scores.update({a: prior(a) + bonus for a in unplayed})
        return max((a for a in allowed if a not in beaten),  # ties: larger rank, grid order
                   key=lambda a: (scores[a], a.rank))

    def update(self, arm: Arm, value: float) -> None:
        """Record the reward `value` that `arm` earned: one more pull, mean smoothed."""
        if arm not in self.stats:
            raise ValueError(f"{arm} is not in this client's grid of {len(self.stats)} arms")
        if not math.isfinite(value):
            raise ValueError(f"reward {value!r} for {arm}; allowed: a finite number")
        s = self.stats[arm]
        s.pulls += 1
        s.mean += max(1.0 / s.pulls, self.config.smoothing) * (value - s.mean)

    def best(self, feasible: Feasible | None = None) -> Arm | None:
        """The played (feasible) arm with the highest smoothed mean, or None."""
        played = [a for a, s in self.stats.items()
                  if s.pulls > 0 and (feasible is None or feasible(a))]
        return max(played, key=lambda a: self.stats[a].mean, default=None)

    def refine(self, feasible: Feasible | None = None) -> list[Arm]:
        """Add the neighbours of the best arm once it has `refine_after` pulls; return them.

        A no-op (empty list) when the best arm is under-played, was refined already, or the
        grid is full. New arms are unplayed: `select` tries each (if feasible) next, or
        with a prior lets each compete by its predicted reward.
        """
        arm = self.best(feasible)
        if arm is None or self.stats[arm].pulls < self.config.refine_after \
                or self.stats[arm].refined:
            return []
        self.stats[arm].refined = True
        added = []
        for new in self._neighbours(arm):
            if len(self.stats) >= self.config.max_arms:
                break
            if new not in self.stats:
                self.stats[new] = ArmStats()
                added.append(new)
        return added

    def _neighbours(self, arm: Arm) -> list[Arm]:
        """Midpoints towards the nearest grid ratio / rank on each side of `arm`."""
        cfg = self.config
        ratios = sorted({a.prune_ratio for a in self.stats})
        ranks = sorted({a.rank for a in self.stats})
        lower = [x for x in ratios if x < arm.prune_ratio] or [0.0]
        upper = [x for x in ratios if x > arm.prune_ratio] or [cfg.max_prune_ratio]
        new_ratios = [round((arm.prune_ratio + lower[-1]) / 2, 6),
                      round((arm.prune_ratio + upper[0]) / 2, 6)]
        below = [r for r in ranks if r < arm.rank] or [arm.rank // 2]
        above = [r for r in ranks if r > arm.rank] or [min(2 * arm.rank, cfg.max_rank)]
        new_ranks = [(arm.rank + below[-1]) // 2, (arm.rank + above[0] + 1) // 2]
        out = [Arm(x, arm.rank) for x in new_ratios
               if min(abs(x - y) for y in ratios) >= cfg.min_ratio_step]
        out += [Arm(arm.prune_ratio, r) for r in new_ranks
                if 1 <= r <= cfg.max_rank and r not in ranks]
        return out

    def state_dict(self) -> dict:
        """Everything needed to continue identically, as plain JSON types."""
        return {"config": self.config.to_dict(),
                "arms": [{"prune_ratio": a.prune_ratio, "rank": a.rank, **asdict(s)}
                         for a, s in self.stats.items()]}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> ClientBandit:
        """Inverse of `state_dict` (arm order, hence tie-breaking, is preserved)."""
        bandit = cls(BanditConfig.from_dict(state["config"]))
        bandit.stats = {}
        for row in state["arms"]:
            arm = Arm(float(row["prune_ratio"]), int(row["rank"]))
            bandit.stats[arm] = ArmStats(pulls=int(row["pulls"]), mean=float(row["mean"]),
                                         refined=bool(row["refined"]))
        return bandit


class BanditBank:
    """One `ClientBandit` per client, keyed by its stable name (`ClientIdentity.name`), never
    by node id: node ids change when a client reconnects, names survive restarts."""

    def __init__(self, config: BanditConfig | None = None) -> None:
        self.config = config or BanditConfig()
        self.bandits: dict[str, ClientBandit] = {}

    def __getitem__(self, name: str) -> ClientBandit:
        """The client's bandit, created with the bank's config on first use."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"client name {name!r}; allowed: a non-empty string "
                             f"(ClientIdentity.name, not a node id)")
        if name not in self.bandits:
            self.bandits[name] = ClientBandit(self.config)
        return self.bandits[name]

    def __contains__(self, name: object) -> bool:
        return name in self.bandits

    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(),
                "clients": {n: b.state_dict() for n, b in sorted(self.bandits.items())}}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> BanditBank:
        bank = cls(BanditConfig.from_dict(state["config"]))
        bank.bandits = {n: ClientBandit.from_state_dict(s) for n, s in state["clients"].items()}
        return bank
