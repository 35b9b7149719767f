"""Standard errors over held-out examples: the formulas the table's error bars come from."""

import math
import random

import pytest

from trainers.stats import mean_se, ratio_se, sd


def test_ratio_se_by_hand():
    # L = 15 / 6 = 2.5; residuals s - L c = -0.5, -1, 1.5; sqrt(3/2 * 3.5) / 6
    assert ratio_se([2.0, 4.0, 9.0], [1, 2, 3]) == pytest.approx(math.sqrt(1.5 * 3.5) / 6, rel=1e-12)
    # equal counts: the plain standard error of the mean of per-token losses
    values = [1.0, 2.0, 4.0, 7.0]
    assert ratio_se([v * 5 for v in values], [5] * 4) == pytest.approx(mean_se(values), rel=1e-12)
    assert sd([1.0, 3.0]) == pytest.approx(math.sqrt(2.0))
    assert math.isnan(ratio_se([1.0], [3])) and math.isnan(sd([1.0])) and math.isnan(mean_se([]))


def test_ratio_se_matches_the_bootstrap_over_examples():
    """The delta-method SE is what resampling held-out examples would show (uneven lengths, uneven losses)."""
    rng = random.Random(0)
    counts = [rng.randint(20, 240) for _ in range(60)]
    sums = [c * rng.uniform(1.5, 3.5) for c in counts]
    means = []
    for _ in range(3000):
        pick = [rng.randrange(60) for _ in range(60)]
        means.append(sum(sums[i] for i in pick) / sum(counts[i] for i in pick))
    assert ratio_se(sums, counts) == pytest.approx(sd(means), rel=0.08)


def test_paired_difference_is_far_tighter_than_unpaired_when_examples_share_difficulty():
    rng = random.Random(1)
    counts = [rng.randint(50, 200) for _ in range(40)]
    hard = [rng.uniform(1.0, 4.0) for _ in counts]  # per-example difficulty both models share
    a = [c * (h + rng.gauss(0, 0.02)) for c, h in zip(counts, hard)]
    b = [c * (h + 0.05 + rng.gauss(0, 0.02)) for c, h in zip(counts, hard)]
    paired = ratio_se([x - y for x, y in zip(a, b)], counts)
    unpaired = math.hypot(ratio_se(a, counts), ratio_se(b, counts))
    assert paired < unpaired / 10
    d = (sum(a) - sum(b)) / sum(counts)
    assert abs(d) > 2 * paired and abs(d) < 2 * unpaired  # distinguishable paired, not unpaired
