"""How sure a number is: standard errors over held-out examples and spreads over seeds (plain Python).

The trial's eval loss is a token-weighted mean, ``L = sum(s_i) / sum(c_i)`` over held-out examples i
(``s_i`` the example's summed token losses, ``c_i`` its target tokens). Tokens of one example are not
independent draws, examples are; so the standard error treats each example as one draw of the pair
(s_i, c_i) and linearizes the ratio (the delta method, as for any ratio estimator):

    SE(L) = sqrt( n / (n - 1) * sum_i (s_i - L c_i)^2 ) / sum_i c_i

The same formula with ``s_i`` replaced by the difference of two models' sums on the same example gives
the *paired* standard error of a difference in eval loss: examples that are hard for both cancel out,
which is why two trials on one test split can be told apart far more finely than their own SEs suggest.
"""

from __future__ import annotations

import math
from typing import Sequence


def ratio_se(sums: Sequence[float], counts: Sequence[int]) -> float:
    """Standard error of ``sum(sums) / sum(counts)`` over examples (nan with fewer than two)."""
    n, total = len(sums), sum(counts)
    if n < 2 or total <= 0:
        return math.nan
    mean = sum(sums) / total
    return math.sqrt(n / (n - 1) * sum((s - mean * c) ** 2 for s, c in zip(sums, counts))) / total


def sd(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); nan with fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_se(values: Sequence[float]) -> float:
    """Standard error of the plain mean of ``values`` (nan with fewer than two)."""
    return sd(values) / math.sqrt(len(values)) if len(values) >= 2 else math.nan
