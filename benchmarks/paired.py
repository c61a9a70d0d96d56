"""Paired-seed statistics of the quality study (``benchmarks/quality.py --stage ...``).

For one metric, a variant and the baseline are trained with the same seeds; seed ``k`` fixes the
initialization, the data order and the diffusion noise of both arms, so their per-seed difference

.. math::
    d_k = m_k^{\\text{variant}} - m_k^{\\text{baseline}}, \\qquad k = 1..n

removes the seed-to-seed spread they share. :func:`paired_comparison` reports the mean
difference :math:`\\bar d`, its two-sided ``confidence`` interval from the paired t
distribution, :math:`\\bar d \\pm t_{n-1, (1+c)/2}\\, s_d / \\sqrt{n}`, and the paired t-test
p-value of :math:`H_0: E[d] = 0` (the same test as ``scipy.stats.ttest_rel``). Relative values
divide by the baseline's mean over the same seeds. Every metric of the study is *lower is
better*, so a negative difference favours the variant.

:func:`holm` adjusts the p-values of the several primary metrics of one comparison
(Holm-Bonferroni, family-wise error rate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PairedComparison", "holm", "paired_comparison"]


@dataclass(frozen=True)
class PairedComparison:
    """Result of :func:`paired_comparison` (``variant - baseline``; ``nan`` where undefined).

    Attributes:
        n: number of paired seeds.
        baseline_mean: mean of the baseline over the paired seeds.
        mean_diff: :math:`\\bar d`.
        ci_low: lower end of the confidence interval of :math:`E[d]` (``nan`` for ``n < 2``).
        ci_high: upper end.
        p_value: two-sided paired t-test p-value (``nan`` for ``n < 2`` or when every
            difference is equal, as ``scipy.stats.ttest_rel``).
        confidence: the interval's confidence level.
    """

    n: int
    baseline_mean: float
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float = 0.95

    def relative(self) -> tuple[float, float, float]:
        """``(mean_diff, ci_low, ci_high) / baseline_mean`` (fractions, not percent)."""
        b = self.baseline_mean
        if b == 0:
            return (math.nan, math.nan, math.nan)
        return (self.mean_diff / b, self.ci_low / b, self.ci_high / b)


def paired_comparison(
    baseline: Sequence[float], variant: Sequence[float], confidence: float = 0.95
) -> PairedComparison:
    """Paired-t summary of ``variant[k] - baseline[k]`` (seed ``k`` in both lists).

    Args:
        baseline: per-seed values of the baseline, ``(n,)``.
        variant: per-seed values of the variant, ``(n,)``, in the same seed order.
        confidence: level of the two-sided interval, in ``(0, 1)``.

    Raises:
        ValueError: lists of different lengths, an empty list, a non-finite value or a
            confidence outside ``(0, 1)``.

    Example:
        >>> r = paired_comparison([1.0, 2.0, 3.0], [0.9, 1.7, 2.9])
        >>> round(r.mean_diff, 4), round(r.ci_low, 4), round(r.ci_high, 4), round(r.p_value, 4)
        (-0.1667, -0.4535, 0.1202, 0.1296)
        >>> round(r.relative()[0], 4)
        -0.0833
    """
    from scipy.stats import t as student_t

    if len(baseline) != len(variant):
        raise ValueError(
            f"paired values need equal lengths, got {len(baseline)} baseline and "
            f"{len(variant)} variant values; pair them by seed first"
        )
    if not baseline:
        raise ValueError("no paired values: both lists are empty")
    values = [float(v) for v in (*baseline, *variant)]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"paired values must be finite, got {values}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(baseline)
    diffs = [float(v) - float(b) for b, v in zip(baseline, variant)]
    mean = sum(diffs) / n
    base_mean = sum(float(b) for b in baseline) / n
    if n < 2:
        return PairedComparison(n, base_mean, mean, math.nan, math.nan, math.nan, confidence)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * se
    if se == 0:
        p = math.nan
    else:
        p = float(2 * student_t.sf(abs(mean) / se, n - 1))
    return PairedComparison(n, base_mean, mean, mean - half, mean + half, p, confidence)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (``nan`` stays ``nan`` and is not
    counted in the family).

    With the ``m`` finite p-values sorted ascending, :math:`\\tilde p_{(i)} =
    \\max_{j \\le i} \\min(1, (m - j + 1) p_{(j)})`.

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(finite)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = round(running, 12)
    return out
