"""Means with confidence intervals over seeds, and whether two configurations differ.

A sweep repeats each configuration over seeds; a table that prints one number per strategy
cannot say whether a difference would survive another seed. These functions give the mean
with the half-width of its two-sided Student-t interval, and the difference of two
configurations: paired by seed when both ran the same seeds (the seed fixes the data split,
the partition, the initialisation and the batch order, so a pair shares them), else Welch's
interval. A difference whose interval contains 0 is "not distinguishable".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from scipy.stats import t as student_t

LEVEL = 0.95
NOT_DISTINGUISHABLE = "not distinguishable"


def t_quantile(df: float, level: float = LEVEL) -> float:
    """The two-sided Student-t critical value for `df` degrees of freedom."""
    return float(student_t.ppf(0.5 + level / 2, df))


def mean_ci(values: Sequence[float], level: float = LEVEL) -> tuple[float, float | None]:
    """(mean, half-width of its `level` interval); None for a single value (no spread)."""
    if not values:
        raise ValueError("mean_ci needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t_quantile(len(values) - 1, level) * statistics.stdev(values) / math.sqrt(
        len(values))


def diff_ci(a: Mapping[int, float], b: Mapping[int, float],
            level: float = LEVEL) -> tuple[float, float | None]:
    """(mean of a − mean of b, half-width of its interval) for values keyed by seed: paired
    over the seeds both have when those are all of each (2 or more), else Welch's."""
    if not a or not b:
        raise ValueError("diff_ci needs values on both sides")
    if a.keys() == b.keys() and len(a) >= 2:
        return mean_ci([a[s] - b[s] for s in a], level)
    (ma, va), (mb, vb) = _mean_var(list(a.values())), _mean_var(list(b.values()))
    if va is None or vb is None:
        return ma - mb, None
    se2 = va / len(a) + vb / len(b)
    if se2 == 0:
        return ma - mb, 0.0
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return ma - mb, t_quantile(df, level) * math.sqrt(se2)


def _mean_var(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.variance(values) if len(values) > 1 else None


def describe_diff(diff: float, half: float | None, digits: int = 4) -> str:
    """"+0.0123 ± 0.0040", or "not distinguishable" when the interval contains 0, or
    "+0.0123 (one seed)" when there is no interval."""
    if half is None:
        return f"{diff:+.{digits}f} (one seed)"
    if abs(diff) <= half:
        return NOT_DISTINGUISHABLE
    return f"{diff:+.{digits}f} ± {half:.{digits}f}"
