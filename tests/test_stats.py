"""Seed-level inference (lora_helpers.stats) against published constants, SciPy, and simulated seeds
with a known answer."""

import numpy as np
import pytest

from lora_helpers.stats import (
    EQUIVALENCE_MARGIN,
    compare_runs,
    gap_recovered,
    seed_differences,
    seed_verdict,
    t_cdf,
    t_interval,
    t_quantile,
)


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (4, 2.776), (5, 2.571), (10, 2.228), (30, 2.042)])
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)


def test_t_quantile_and_cdf_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 50):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-5)
        for t in (-3.0, -0.5, 0.0, 1.3, 6.0):
            assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-7)


def test_t_interval_by_hand():
    ci = t_interval([0.01, 0.03, 0.02])
    half = 4.302653 * 0.01 / np.sqrt(3)
    assert ci["mean"] == pytest.approx(0.02) and ci["sd"] == pytest.approx(0.01)
    assert (ci["low"], ci["high"]) == pytest.approx((0.02 - half, 0.02 + half), rel=1e-5)
    assert t_interval([0.5])["low"] is None


def _simulated_runs(rng, n_seeds, accuracy, seed_sd, n_test, first_seed=0):
    """Runs whose test accuracy = the configuration's accuracy + seed noise + the test sample's binomial noise."""
    out = []
    for s in range(first_seed, first_seed + n_seeds):
        p = float(np.clip(accuracy + rng.normal(0, seed_sd), 0, 1))
        out.append({"seed": s, "test_accuracy": rng.binomial(n_test, p) / n_test})
    return out


def test_interval_covers_a_known_difference_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    delta, hits, draws = 0.03, 0, 2000
    for _ in range(draws):
        a = _simulated_runs(rng, 3, 0.80 + delta, 0.015, 1000)
        b = _simulated_runs(rng, 3, 0.80, 0.015, 1000)
        ci = t_interval(seed_differences(a, b))
        hits += ci["low"] <= delta <= ci["high"]
    assert 0.93 <= hits / draws <= 0.97, hits / draws


def test_two_seed_groups_of_one_configuration_are_rarely_called_different():
    """The same-configuration control: at most the interval's 5% error, never a systematic 'better'/'worse'."""
    rng = np.random.default_rng(1)
    verdicts = []
    for _ in range(1000):
        a = _simulated_runs(rng, 3, 0.80, 0.015, 1000, first_seed=0)
        b = _simulated_runs(rng, 3, 0.80, 0.015, 1000, first_seed=3)
        verdicts.append(compare_runs(a, b, n_test=1000, by_seed=False)["verdict"])
    different = sum(v in ("better", "worse") for v in verdicts) / len(verdicts)
    assert different <= 0.07, different
    assert set(verdicts) <= {"better", "worse", "equivalent", "inconclusive"}


def test_equivalence_needs_enough_seeds_and_a_real_difference_is_found():
    rng = np.random.default_rng(2)
    # 10 seeds of two equal configurations with little seed noise: the interval fits inside ±2 points
    a = _simulated_runs(rng, 10, 0.80, 0.004, 5000)
    b = _simulated_runs(rng, 10, 0.80, 0.004, 5000)
    assert compare_runs(a, b, n_test=5000)["verdict"] == "equivalent"
    # the same noise, 5 points apart: "better", whatever the margin
    c = _simulated_runs(rng, 10, 0.85, 0.004, 5000)
    assert compare_runs(c, b, n_test=5000)["verdict"] == "better"
    assert compare_runs(b, c, n_test=5000)["verdict"] == "worse"


def test_a_seed_at_chance_makes_the_comparison_unstable_and_one_seed_gives_no_verdict():
    learned = [{"seed": s, "test_accuracy": a} for s, a in enumerate([0.80, 0.81, 0.79])]
    one_failed = [{"seed": s, "test_accuracy": a} for s, a in enumerate([0.50, 0.83, 0.84])]
    assert compare_runs(one_failed, learned, n_test=1000)["verdict"] == "unstable"
    all_failed = [{"seed": s, "test_accuracy": a} for s, a in enumerate([0.50, 0.49, 0.51])]
    assert compare_runs(all_failed, learned, n_test=1000)["verdict"] == "worse"  # consistently, not unstable
    assert seed_verdict([0.05])["verdict"] == "no verdict"
    assert seed_verdict([-0.01, -0.01])["verdict"] == "no verdict"  # two seeds agreeing exactly: a zero-width interval
    assert seed_verdict([0.05, 0.06], margin=EQUIVALENCE_MARGIN)["margin"] == 0.02


def test_seed_differences_pair_by_seed_or_in_order():
    a = [{"seed": 2, "test_accuracy": 0.9}, {"seed": 0, "test_accuracy": 0.7}]
    b = [{"seed": 0, "test_accuracy": 0.6}, {"seed": 2, "test_accuracy": 0.5}]
    assert seed_differences(a, b) == pytest.approx([0.4, 0.1])
    assert seed_differences(a, b, by_seed=False) == pytest.approx([0.3, 0.2])
    with pytest.raises(ValueError, match="no seed in common"):
        seed_differences(a, [{"seed": 5, "test_accuracy": 0.5}])
    with pytest.raises(ValueError, match="one size"):
        seed_differences(a, b[:1], by_seed=False)


def test_gap_recovered_known_answer():
    head = [{"seed": s, "test_accuracy": 0.60 + 0.01 * s} for s in range(3)]
    full = [{"seed": s, "test_accuracy": 0.80 + 0.02 * s} for s in range(3)]
    half = [
        {"seed": s, "test_accuracy": (h["test_accuracy"] + f["test_accuracy"]) / 2}
        for s, h, f in zip(range(3), head, full)
    ]
    out = gap_recovered(half, full, head)
    assert out["mean"] == pytest.approx(0.5) and out["shares"] == pytest.approx([0.5] * 3)
    with pytest.raises(ValueError, match="undefined"):
        gap_recovered(half, head, head)


def test_seeds_needed_by_hand():
    from lora_helpers.stats import seeds_needed

    # sd 0.02, margin 0.02: t(n-1) / sqrt(n) < 1 first at n = 7 (2.447 / 2.646 = 0.925; n = 6: 2.571 / 2.449 = 1.05)
    assert seeds_needed(0.02, 0.02) == 7
    assert seeds_needed(0.01, 0.02, mean=0.025) is None
    n = seeds_needed(0.03, 0.02, mean=0.005)
    assert (
        t_quantile(0.975, n - 1) * 0.03 / n**0.5 + 0.005
        < 0.02
        <= t_quantile(0.975, n - 2) * 0.03 / (n - 1) ** 0.5 + 0.005
    )


def test_median_interval_order_statistics():
    from lora_helpers.stats import median_interval

    # n = 10: P(B <= 1) = 11/1024 <= 2.5% < P(B <= 2) = 56/1024, so the interval is [x_(2), x_(9)] (the textbook value)
    got = median_interval(range(1, 11))
    assert (got["low"], got["high"], got["median"]) == (2.0, 9.0, 5.5)
    with pytest.raises(ValueError, match="too few"):
        median_interval([1, 2, 3, 4, 5])  # 2 / 32 > 2.5%: no 95% interval from five values


def test_median_interval_covers_a_skewed_median():
    """Exponential timings (a long right tail, median ln 2): n = 25 gives [x_(8), x_(18)], exact coverage 95.7%."""
    import math
    import random

    from lora_helpers.stats import median_interval

    rng = random.Random(0)
    covered = 0
    for _ in range(2000):
        got = median_interval([rng.expovariate(1.0) for _ in range(25)])
        covered += got["low"] <= math.log(2) <= got["high"]
    assert 0.94 <= covered / 2000 <= 0.975
