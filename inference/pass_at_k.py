"""The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

With n samples of a problem of which c pass, pass@k = 1 - C(n - c, k) / C(n, k): the chance that k samples drawn
without replacement from the n include a passing one. The binomials overflow a float long before n is large
(C(2000, 1000) has 600 digits), so it is computed as their paper's numerically stable product,
1 - prod_{i = n - c + 1}^{n} (1 - k / i).
"""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c of them correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass@k needs integers, got n={n!r}, c={c!r}, k={k!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: correct samples c={c} must be between 0 and the samples n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k={k} must be between 1 and the samples per problem n={n}")
    if n - c < k:  # every draw of k includes a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(results: list[tuple[int, int]], ks: list[int]) -> dict[int, float]:
    """{k: pass@k averaged over problems} for (n, c) per problem; every problem needs at least k samples."""
    if not results:
        raise ValueError("pass@k: no problems")
    out = {}
    for k in ks:
        short = [i for i, (n, _) in enumerate(results) if n < k]
        if short:
            raise ValueError(f"pass@{k}: problem {short[0]} has {results[short[0]][0]} samples, fewer than k={k}")
        out[k] = sum(pass_at_k(n, c, k) for n, c in results) / len(results)
    return out
