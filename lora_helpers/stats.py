"""Is one method better than another? Seed-level inference: the seed is the unit of replication.

A trained model's test accuracy depends on two kinds of chance: which reviews were
drawn for the test split, and which seed trained it (head init, LoRA's A, batch order,
dropout masks). McNemar's test (``runner.mcnemar``) sees only the first: it asks
whether two *fixed* models differ on these test reviews. Two seeds of one
configuration often differ "significantly" by McNemar, so it cannot say whether a
*method* is better. This module asks the method-level question:

* ``seed_differences``: per seed, accuracy of A minus accuracy of B on the shared test
  reviews (runs paired by seed; two groups of seeds of one configuration paired in order);
* ``t_interval``: mean and 95% interval of those differences, Student's t over seeds
  (``t_quantile`` computes the quantile from the t density, no SciPy needed);
* ``seed_verdict``: "better" / "worse" when the interval excludes 0; "equivalent" when it
  lies inside ``±margin``, a margin stated before the run (``EQUIVALENCE_MARGIN``); the
  95% interval makes this two one-sided tests at 2.5% each, stricter than the usual TOST at
  5% (a 90% interval); "unstable" when a seed failed to learn (a run at chance beside runs
  that learned); "inconclusive" otherwise; no verdict from one seed;
* ``gap_recovered``: the share of the head-only -> full fine-tuning gap that a method
  recovers, per seed, with its interval.

The intervals are conditional on the test split: every seed is scored on the same test
reviews (drawn once, with the profile's seed), so they cover what another seed would do,
not which reviews were drawn. At the sizes of the committed runs the review-sampling part of
a difference is a fraction of the seed part; with many seeds it would not be.

Introduced in notebook 04 (``04_lora_vs_full_finetuning.ipynb``), used by ``compare`` and
notebook 05.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import RunResult

# "LoRA matches full fine-tuning" means: the 95% interval of the seed-level difference lies inside
# ±2 accuracy points. Fixed before the committed cpu comparison and Section-7 study were run (the committed
# quick comparison is older); change it only with new runs.
EQUIVALENCE_MARGIN = 0.02

VERDICTS = ("better", "worse", "equivalent", "inconclusive", "unstable", "no verdict")

# Fewer seeds give no verdict: with two, the t interval has one degree of freedom (t = 12.7) and its width rests
# on a single difference of differences; two seeds that happen to agree exactly give a zero-width interval.
MIN_SEEDS = 3


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda x: math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))  # noqa: E731
    x, n = abs(t), 2000  # even number of panels
    h = x / n
    area = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
    half = area * h / 3  # P(0 <= T <= |t|)
    return 0.5 + half if t >= 0 else 0.5 - half


@lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on ``t_cdf``): ``t_quantile(0.975, 2)`` = 4.303."""
    if not 0 < p < 1:
        raise ValueError(f"p must be between 0 and 1, got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def t_interval(values: Iterable[float], confidence: float = 0.95) -> dict:
    """``{"n", "mean", "sd", "low", "high"}``: mean and two-sided t interval over ``values`` (one per seed).

    With one value the interval is undefined (``low = high = None``): one seed gives no verdict.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("t_interval needs at least one value")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return {"n": 1, "mean": mean, "sd": 0.0, "low": None, "high": None}
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def median_interval(values: Iterable[float], confidence: float = 0.95) -> dict:
    """Median of ``values`` with a distribution-free interval: two order statistics.

    The k-th smallest of n values lies below the true median with the probability that at
    least k of n fair coins land heads, so ``[x_(j), x_(n+1-j)]`` covers the median at least
    ``confidence`` of the time for the largest j whose binomial tail is at most
    ``(1 - confidence) / 2``. No normality assumed: right for timings, whose distribution
    has a long slow tail. Needs n >= 6 for 95%. ``{"median", "low", "high", "n"}``.
    Introduced in notebook 06 (timing the unmerged, merged and base models).
    """
    xs = sorted(float(v) for v in values)
    n, tail = len(xs), (1 - confidence) / 2
    j, below = 0, 0.0
    while j < n and below + math.comb(n, j) / 2**n <= tail:  # P(Binomial(n, 1/2) <= j) <= tail
        below += math.comb(n, j) / 2**n
        j += 1
    if j == 0:
        raise ValueError(f"{n} values are too few for a {confidence:.0%} interval of the median: time more rounds")
    return {"median": statistics.median(xs), "low": xs[j - 1], "high": xs[n - j], "n": n}


def accuracy_of(run: RunResult | dict) -> float:
    """Test accuracy of a ``RunResult`` or of its ``metrics()`` dict."""
    return run["test_accuracy"] if isinstance(run, dict) else run.test_accuracy


def _seed_of(run) -> int:
    return run["seed"] if isinstance(run, dict) else run.seed


def seed_differences(runs_a: list, runs_b: list, by_seed: bool = True) -> list[float]:
    """Test accuracy of A minus B, one value per pair of runs.

    ``by_seed``: pair the runs that share a seed (two methods trained with seeds 0, 1, 2);
    otherwise pair them in order (two groups of seeds of one configuration: 0-2 against 3-5).
    """
    if by_seed:
        b = {_seed_of(r): r for r in runs_b}
        pairs = [(r, b[_seed_of(r)]) for r in runs_a if _seed_of(r) in b]
        if not pairs:
            raise ValueError(f"no seed in common: {[_seed_of(r) for r in runs_a]} against {sorted(b)}")
    else:
        if len(runs_a) != len(runs_b):
            raise ValueError(f"pairing in order needs groups of one size, got {len(runs_a)} and {len(runs_b)}")
        pairs = list(zip(runs_a, runs_b))
    return [accuracy_of(a) - accuracy_of(b) for a, b in pairs]


def at_chance(accuracy: float, n_test: int) -> bool:
    """True when ``accuracy`` on ``n_test`` balanced reviews is not two standard errors above 0.5 (a run that
    did not learn)."""
    return accuracy < 0.5 + 2 * math.sqrt(0.25 / n_test)


def seed_verdict(
    differences: Iterable[float],
    margin: float = EQUIVALENCE_MARGIN,
    confidence: float = 0.95,
    accuracies_a: Iterable[float] | None = None,
    accuracies_b: Iterable[float] | None = None,
    n_test: int | None = None,
) -> dict:
    """The method-level verdict on A - B from the per-seed ``differences`` (``seed_differences``).

    In this order: fewer than ``MIN_SEEDS`` (3) seeds -> "no verdict"; "unstable" when the seeds disagree about
    whether the configuration
    learns at all: a group mixes runs at chance (``at_chance``, given the accuracies and ``n_test``) with runs that
    learned (its mean and interval then describe no typical run); "equivalent" when the interval lies inside
    ``±margin``; "better" / "worse" when it excludes 0; otherwise "inconclusive". Returns the ``t_interval`` with
    ``verdict``, ``margin`` and ``direction`` ("better" / "worse" whenever the interval excludes 0, so that an
    "equivalent" that is also a small but real difference is not hidden; else None).
    """
    ci = t_interval(differences, confidence)
    direction = None
    if ci["low"] is not None and (ci["low"] > 0 or ci["high"] < 0):
        direction = "better" if ci["low"] > 0 else "worse"
    out = {**ci, "margin": margin, "confidence": confidence, "direction": direction}
    if ci["n"] < MIN_SEEDS:
        return {**out, "verdict": "no verdict"}
    mixed = False
    if n_test is not None:
        for group in (accuracies_a, accuracies_b):
            flags = [at_chance(a, n_test) for a in group or []]
            mixed = mixed or (any(flags) and not all(flags))
    if mixed:
        return {**out, "verdict": "unstable"}
    if -margin < ci["low"] and ci["high"] < margin:  # may also exclude 0: "direction" keeps that
        return {**out, "verdict": "equivalent"}
    if ci["low"] > 0:
        return {**out, "verdict": "better"}
    if ci["high"] < 0:
        return {**out, "verdict": "worse"}
    return {**out, "verdict": "inconclusive"}


def compare_runs(
    runs_a: list, runs_b: list, n_test: int, margin: float = EQUIVALENCE_MARGIN, by_seed: bool = True
) -> dict:
    """``seed_verdict`` of A against B straight from their runs (``RunResult`` or ``metrics()`` dicts)."""
    diffs = seed_differences(runs_a, runs_b, by_seed)
    return {
        **seed_verdict(
            diffs,
            margin,
            accuracies_a=[accuracy_of(r) for r in runs_a],
            accuracies_b=[accuracy_of(r) for r in runs_b],
            n_test=n_test,
        ),
        "differences": diffs,
    }


def gap_recovered(runs: list, full_runs: list, head_runs: list, confidence: float = 0.95) -> dict:
    """Share of the head-only -> full fine-tuning gap that ``runs`` recover: per seed
    ``(method - head) / (full - head)``, then ``t_interval`` over seeds (1.0: as good as full fine-tuning).

    Seeds where full fine-tuning does not beat head-only are left out (the share is undefined there) and
    counted in ``seeds_left_out``.
    """
    full = {_seed_of(r): accuracy_of(r) for r in full_runs}
    head = {_seed_of(r): accuracy_of(r) for r in head_runs}
    paired = [r for r in runs if _seed_of(r) in full and _seed_of(r) in head]
    shares = [(accuracy_of(r) - head[s]) / (full[s] - head[s]) for r in paired if full[s := _seed_of(r)] > head[s]]
    if not shares:
        raise ValueError("no seed where full fine-tuning beats head-only: the gap is undefined")
    return {**t_interval(shares, confidence), "shares": shares, "seeds_left_out": len(paired) - len(shares)}


def seeds_needed(
    sd: float, margin: float = EQUIVALENCE_MARGIN, mean: float = 0.0, confidence: float = 0.95, most: int = 1000
) -> int | None:
    """The smallest n with ``|mean| + t(n - 1) sd / sqrt(n) < margin``: how many seeds an interval would need to
    fit just inside ``±margin`` *if* the mean and sd stayed as observed (None: not within ``most`` seeds).

    A planning figure, not a promise: a new run's mean and sd will differ, and at that n the interval fits only
    about half the time.
    """
    if abs(mean) >= margin or abs(mean) + 1.959 * sd / math.sqrt(most) >= margin:  # the t bound exceeds z's
        return None
    for n in range(2, most + 1):
        if abs(mean) + t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) < margin:
            return n
    return None
