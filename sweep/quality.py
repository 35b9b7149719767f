"""How sure the table is: each configuration's eval loss and ROUGE-L with their noise, and the quality
rule that uses it (``sweep/summary.py`` lays out the table; the formulas are in ``trainers/stats.py``).

Two kinds of noise separate one number from the one a rerun would give:
  held-out  the test split is a sample of examples. Two trials measured on the same split are compared
            *paired*, example by example, from the per-example losses each trial leaves in heldout.json
            (for each loss: the eval loss, and the response loss that trials differing in loss_on compare on)
            (unpaired, sqrt(SE_a^2 + SE_b^2), when those are missing).
  seeds     training itself is random (LoRA init, dropout, data order). Only a sweep with ``seeds`` > 1
            measures it: a configuration's number is then the mean over its seeds, its spread the sample
            standard deviation, and a difference of means carries sd_a^2/n_a + sd_b^2/n_b on top.
A difference is *within noise* when it is no larger than Z = 2 standard errors of that difference.

The rule, per configuration (all its seeds together):
  high    its eval loss is within 2% of the best configuration's, or not distinguishable from it
  medium  within 10% of the best, or not distinguishable from that
  low     further off, *or* not better than the base model beyond noise, *or* its generations loop
          (50% or more of their token 3-grams repeat) or are very short (under 5 words on average)
A configuration is never labelled above one with a lower eval loss, so the labels follow eval loss.
"""

from __future__ import annotations

import math

from trainers.stats import ratio_se, sd

Z = 2.0
HIGH_GAP, MEDIUM_GAP, LOOP_RATE, SHORT_WORDS = 0.02, 0.10, 0.5, 5
LABELS = ("low", "medium", "high")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mean(xs):
    xs = [x for x in xs if finite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def per_example(heldout: dict | None, loss: str) -> dict | None:
    """A trial's heldout.json narrowed to one loss: row_ids, sums and counts (None when it has not that loss)."""
    one = (heldout or {}).get("losses", {}).get(loss)
    return {"row_ids": heldout["row_ids"], **one} if one else None


class Group:
    """One configuration: its finished runs (one per seed) and their statistics."""

    def __init__(self, name: str, runs: list[dict], heldout: dict[str, dict], loss: str = "eval_loss"):
        """``loss``: the runs' loss this group is judged on (``eval_loss``, or ``response_loss`` when the
        trials' loss_on differs: ``sweep.summary.compared_on``)."""
        self.name, self.runs, self.key = name, runs, loss
        self.n = len(runs)
        self.loss = _mean(r[loss] for r in runs)
        self.loss_sd = sd([r[loss] for r in runs])
        self.rouge = _mean(r["rouge_l"] for r in runs)
        self.rouge_sd = sd([r["rouge_l"] for r in runs])
        one = runs[0]["rouge_l_se"] if runs else math.nan
        self.rouge_se = self.rouge_sd / math.sqrt(self.n) if self.n >= 2 else one
        self.repeat = _mean(r["repeat_ngram_rate"] for r in runs)
        self.words = _mean(r["gen_mean_words"] for r in runs)
        per_run = [per_example(heldout.get(r["trial_id"]), loss) for r in runs]
        self.sums = None  # per-example summed losses averaged over seeds, when every run left them
        if runs and all(per_run) and len({tuple(h["row_ids"]) for h in per_run}) == 1:
            self.row_ids, self.counts = per_run[0]["row_ids"], per_run[0]["counts"]
            self.sums = [sum(col) / self.n for col in zip(*(h["sums"] for h in per_run))]
        self.loss_se = ratio_se(self.sums, self.counts) if self.sums else _mean(r.get(f"{loss}_se") for r in runs)

    def seed_var(self) -> float:
        return self.loss_sd ** 2 / self.n if self.n >= 2 else 0.0

    def diff(self, other: "Group") -> tuple[float, float]:
        """(self - other) in the group's loss and the standard error of that difference."""
        d = self.loss - other.loss
        if self.sums and other.sums and self.row_ids == other.row_ids:
            held = ratio_se([a - b for a, b in zip(self.sums, other.sums)], self.counts)
        else:
            held = math.sqrt(self.loss_se ** 2 + other.loss_se ** 2)
        return d, math.sqrt(held ** 2 + self.seed_var() + other.seed_var())


def label_for(gap: float) -> str:
    return "high" if gap <= HIGH_GAP else "medium" if gap <= MEDIUM_GAP else "low"


def assess(groups: list[Group], base: Group | None) -> dict[str, dict]:
    """Group name -> its quality, vs base (+- SE) and vs best (+- SE); ``groups`` are the finished ones."""
    out = {}
    best = min(groups, key=lambda g: g.loss, default=None)
    ceiling = "high"
    for g in sorted(groups, key=lambda g: g.loss):
        d_best, se_best = g.diff(best)
        # optimistic end of the difference: demoted only when it is beyond noise
        gap = max(d_best - Z * se_best, 0.0) / abs(best.loss) if best.loss else 0.0
        loss_label = min(label_for(gap), ceiling, key=LABELS.index)
        ceiling = loss_label  # never above a configuration with a lower eval loss
        d_base, se_base = g.diff(base) if base is not None else (math.nan, math.nan)
        no_gain = base is not None and d_base > -Z * se_base
        # NaN (nothing was generated for: no eval_prompts, heldout_prompts=0) is no evidence of either
        degenerate = (finite(g.repeat) and g.repeat >= LOOP_RATE) or (finite(g.words) and g.words < SHORT_WORDS)
        out[g.name] = {"quality": "low" if degenerate or no_gain else loss_label, "vs_base": d_base,
                       "vs_base_se": se_base, "vs_best": d_best, "vs_best_se": se_best,
                       "tied_with_best": g is not best and abs(d_best) <= Z * se_best}
    return out
