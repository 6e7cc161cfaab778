"""selftrain.analysis.evidence: what a rank correlation over n corpora can show, by exact counts.

Each p-value here is counted by hand: a perfect ranking of n corpora is matched by 2 of the n!
orderings (itself and its reverse); one adjacent swap (sum of squared rank differences 2) by
the n - 1 single adjacent swaps and the identity, on each side.
"""

import math

import numpy as np
import pytest

from selftrain.analysis.evidence import (
    PERMUTATIONS,
    holm,
    permutation_p,
    rho_interval,
    smallest_p,
    verdict,
)


def swapped(n: int) -> np.ndarray:
    """1..n with its first two entries exchanged (rho = 1 - 12 / (n^3 - n))."""
    y = np.arange(1, n + 1, dtype=float)
    y[[0, 1]] = y[[1, 0]]
    return y


@pytest.mark.parametrize("n", [5, 10])
def test_exact_p_values_are_the_hand_counted_ones(n):
    x = np.arange(1, n + 1, dtype=float)
    p, method = permutation_p(x, x)
    assert p == pytest.approx(2 / math.factorial(n), rel=1e-12)
    assert method == f"exact, all {math.factorial(n):,} orderings"
    assert smallest_p(x, x) == pytest.approx(2 / math.factorial(n), rel=1e-12)
    p, _ = permutation_p(x, swapped(n))  # the identity and n - 1 adjacent swaps, either sign
    assert p == pytest.approx(2 * n / math.factorial(n), rel=1e-12)


def test_thirty_corpora_take_random_orderings_and_say_so():
    x = np.arange(1, 31, dtype=float)
    p, method = permutation_p(x, x)
    assert p == 1 / (PERMUTATIONS + 1)  # no random ordering is as extreme as a perfect one
    assert method == f"{PERMUTATIONS:,} random orderings"
    assert smallest_p(x, x) == 2 / math.factorial(30)


def test_the_interval_is_fisher_z_with_the_bonett_wright_error():
    low, high = rho_interval(0.1, 30)
    half = 1.959963984540054 * math.sqrt((1 + 0.1 ** 2 / 2) / 27)
    assert (low, high) == pytest.approx((math.tanh(math.atanh(0.1) - half),
                                         math.tanh(math.atanh(0.1) + half)))
    assert (low, high) == pytest.approx((-0.2709, 0.4450), abs=1e-4)
    assert all(math.isnan(v) for v in rho_interval(0.9, 3))


def test_holm_steps_down_and_keeps_monotone():
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan],
                                                               nan_ok=True)


def test_the_verdict_for_5_10_and_30_corpora():
    perfect5 = 1 / 60
    assert verdict(5, 1.0, holm([perfect5])[0], rho_interval(1.0, 5), perfect5, 1) \
        .startswith("a monotone relation (Holm-adjusted p = 0.0167 over 1 tests)")
    thirty_tests = holm([perfect5] * 30)[0]
    assert thirty_tests == 0.5
    said = verdict(5, 1.0, thirty_tests, rho_interval(1.0, 5), perfect5, 30)
    assert said.startswith("not resolved") and "n = 5 allows p >= 0.0167, so after Holm " \
        "over 30 tests nothing could pass" in said
    p10 = 20 / math.factorial(10)  # one adjacent swap
    assert verdict(10, 1 - 12 / 990, holm([p10] * 30)[0], rho_interval(0.988, 10),
                   2 / math.factorial(10), 30).startswith("a monotone relation")
    assert verdict(30, 0.1, 0.6, rho_interval(0.1, 30), 2 / math.factorial(30), 30) == (
        "no relation as strong as |ρ| = 0.5 (95% interval [-0.27, 0.45])")
    said = verdict(10, 0.1, 0.8, rho_interval(0.1, 10), 2 / math.factorial(10), 30)
    assert said == "not resolved (95% interval [-0.57, 0.69])"
