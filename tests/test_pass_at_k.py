"""The unbiased pass@k estimator against hand-computed values and exact rational arithmetic."""

from fractions import Fraction
from math import comb

import pytest

from mtplm.inference.pass_at_k import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n, c, k, want", [
    (5, 2, 1, 2 / 5),            # pass@1 is the fraction correct
    (5, 2, 2, 1 - 3 / 10),       # 1 - C(3,2)/C(5,2)
    (4, 1, 3, 1 - 1 / 4),        # 1 - C(3,3)/C(4,3)
    (10, 3, 4, 1 - 35 / 210),    # 1 - C(7,4)/C(10,4)
    (10, 0, 5, 0.0),             # nothing passes
    (10, 8, 3, 1.0),             # n - c < k: every draw of 3 holds a correct one
    (1, 1, 1, 1.0),
])
def test_hand_computed(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(200, 10, 100), (2000, 3, 1000), (2000, 1990, 5), (5000, 1, 10)])
def test_large_n_matches_exact_binomials(n, c, k):
    """C(2000, 1000) overflows a float; the product form stays exact to rounding."""
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)


def test_mean_over_problems_and_bad_input():
    assert mean_pass_at_k([(5, 2), (4, 1), (10, 0)], [1, 3]) == pytest.approx(
        {1: (2 / 5 + 1 / 4 + 0) / 3, 3: ((1 - 1 / 10) + (1 - 1 / 4) + 0) / 3})
    with pytest.raises(ValueError, match="problem 1 has 2 samples, fewer than k=3"):
        mean_pass_at_k([(5, 2), (2, 1)], [3])
    with pytest.raises(ValueError, match="c=6 must be between 0 and the samples n=5"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="k=0 must be between 1"):
        pass_at_k(5, 1, 0)
    with pytest.raises(TypeError):
        pass_at_k(5.0, 1, 1)
