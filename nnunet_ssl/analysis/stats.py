"""Statistics for comparing fine-tuned models: means, performance gap, paired Wilcoxon test, seed spread.

Pure functions on per-case scores. A score table is ``{case_id: {structure: value}}``; NaN marks an
undefined value (nnU-Net writes NaN Dice for a structure absent from both prediction and reference)
and is skipped by every mean and dropped from every pairing, never counted as 0 or 1.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Name of the structure-averaged score.
OVERALL = "overall"
#: Significance level used in the report's wording.
ALPHA = 0.05
#: Fewer non-zero paired differences than this gives no test (``n/a``).
MIN_NONZERO_PAIRS = 2
#: Paired differences are rounded to this many decimals, so that differences equal up to float noise
#: (0.85 - 0.80 vs 0.70 - 0.65) tie in the ranking and exact zeros count as zero.
DIFFERENCE_DECIMALS = 12

CaseScores = Mapping[str, Mapping[str, float]]


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def nan_mean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    kept = _finite(values)
    return float(np.mean(kept)) if kept else float("nan")


def case_overall(scores: Mapping[str, float], structures: Sequence[str]) -> float:
    """One case's structure-averaged score (NaN structures skipped)."""
    return nan_mean([scores.get(s, float("nan")) for s in structures])


def with_overall(table: CaseScores, structures: Sequence[str]) -> dict[str, dict[str, float]]:
    """Copy of ``table`` where every case also has an :data:`OVERALL` entry."""
    return {
        case: {**{s: float(v.get(s, float("nan"))) for s in structures}, OVERALL: case_overall(v, structures)}
        for case, v in table.items()
    }


def structure_means(table: CaseScores, structures: Sequence[str]) -> dict[str, float]:
    """Mean over cases per structure, plus :data:`OVERALL` = mean over structures of those means.

    The overall value is the unweighted mean of the per-structure means (like nnU-Net's
    ``foreground_mean``), so every structure counts the same whatever its number of defined cases.
    """
    means = {s: nan_mean([scores.get(s, float("nan")) for scores in table.values()]) for s in structures}
    means[OVERALL] = nan_mean(list(means.values()))
    return means


def finite_or_nan(table: CaseScores) -> dict[str, dict[str, float]]:
    """Copy of ``table`` with infinite values as NaN, so they are skipped, not averaged in.

    An infinite distance means a structure was missed entirely (HD95).
    """
    return {c: {s: (v if math.isfinite(v) else math.nan) for s, v in scores.items()} for c, scores in table.items()}


def case_counts(table: CaseScores, structures: Sequence[str]) -> dict[str, int]:
    """Number of cases with a defined (non-NaN) value per structure, and the number of cases overall."""
    counts = {s: len(_finite([scores.get(s, float("nan")) for scores in table.values()])) for s in structures}
    counts[OVERALL] = len(table)
    return counts


def performance_gap(accuracy: float, reference: float) -> float:
    """Performance gap in percent: ``100 * (accuracy - reference) / reference``.

    NaN when either value is undefined or the reference is 0 (the relative gap does not exist).
    """
    if math.isnan(accuracy) or math.isnan(reference) or reference == 0:
        return float("nan")
    return 100.0 * (accuracy - reference) / reference


def performance_gaps(means: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """:func:`performance_gap` per key of ``means`` (structures and :data:`OVERALL`)."""
    return {key: performance_gap(value, reference.get(key, float("nan"))) for key, value in means.items()}


def paired_values(
    values: Mapping[str, float], reference: Mapping[str, float]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pair two ``{case_id: value}`` maps by case id.

    Only cases present in both with a defined (non-NaN) value in both are kept, sorted by case id.

    Returns:
        (case ids, values (N,), reference values (N,)).
    """
    cases = sorted(
        c for c in set(values) & set(reference) if not math.isnan(values[c]) and not math.isnan(reference[c])
    )
    return cases, np.array([values[c] for c in cases], float), np.array([reference[c] for c in cases], float)


@dataclass(frozen=True)
class WilcoxonResult:
    """Outcome of one paired two-sided Wilcoxon signed-rank test.

    Attributes:
        n_pairs: Cases scored by both (NaN dropped).
        n_nonzero: Pairs with a non-zero difference (the ones the test ranks).
        statistic: scipy's statistic, min(W+, W-), or None when not tested.
        p_value: Two-sided p-value, or None when not tested.
        reason: Why there is no test (empty when tested).
        note: Caveat for a valid test (e.g. too few pairs to ever reach p < 0.05).
    """

    n_pairs: int
    n_nonzero: int
    statistic: float | None
    p_value: float | None
    reason: str = ""
    note: str = ""

    @property
    def tested(self) -> bool:
        return self.p_value is not None

    def describe(self) -> str:
        """Short text for tables: ``p=0.031`` or ``n/a (reason)``."""
        return f"p={format_p(self.p_value)}" if self.p_value is not None else f"n/a ({self.reason})"


def format_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def smallest_attainable_p(n_nonzero: int) -> float:
    """Smallest two-sided exact p of the signed-rank test with ``n`` non-zero differences: ``2 / 2**n``."""
    return min(1.0, 2.0 / 2.0**n_nonzero)


def wilcoxon_paired(values: Mapping[str, float], reference: Mapping[str, float]) -> WilcoxonResult:
    """Paired two-sided Wilcoxon signed-rank test of ``values`` against ``reference``, paired by case id.

    Uses ``scipy.stats.wilcoxon`` with its defaults (``zero_method="wilcox"``: zero differences are
    dropped; exact distribution for small samples without ties). No test (``n/a``) when no case is
    scored by both, when every difference is zero, or with fewer than :data:`MIN_NONZERO_PAIRS`
    non-zero differences. Differences are rounded to :data:`DIFFERENCE_DECIMALS` decimals first.
    """
    from scipy.stats import wilcoxon

    cases, a, b = paired_values(values, reference)
    differences = np.round(a - b, DIFFERENCE_DECIMALS)
    n_nonzero = int(np.count_nonzero(differences))
    if not cases:
        return WilcoxonResult(0, 0, None, None, reason="no case scored by both")
    if n_nonzero == 0:
        return WilcoxonResult(len(cases), 0, None, None, reason=f"all {len(cases)} paired differences are zero")
    if n_nonzero < MIN_NONZERO_PAIRS:
        return WilcoxonResult(
            len(cases), n_nonzero, None, None, reason=f"only {n_nonzero} non-zero paired difference(s)"
        )
    result = wilcoxon(differences, zero_method="wilcox", alternative="two-sided")
    floor = smallest_attainable_p(n_nonzero)
    note = (
        f"with {n_nonzero} non-zero differences p cannot go below {floor:.3g}" if floor > ALPHA else ""
    )
    return WilcoxonResult(len(cases), n_nonzero, float(result.statistic), float(result.pvalue), note=note)


def column(table: CaseScores, key: str) -> dict[str, float]:
    """``{case_id: value}`` for one structure (or :data:`OVERALL` of a :func:`with_overall` table)."""
    return {case: float(scores.get(key, float("nan"))) for case, scores in table.items()}


def wilcoxon_per_structure(
    table: CaseScores, reference: CaseScores, structures: Sequence[str]
) -> dict[str, WilcoxonResult]:
    """:func:`wilcoxon_paired` per structure and on the per-case structure mean (:data:`OVERALL`)."""
    a, b = with_overall(table, structures), with_overall(reference, structures)
    return {key: wilcoxon_paired(column(a, key), column(b, key)) for key in [*structures, OVERALL]}


@dataclass(frozen=True)
class Spread:
    """Mean and spread of one value over seeds (sample std, ddof=1; NaN with fewer than 2 values)."""

    n: int
    mean: float
    std: float
    minimum: float
    maximum: float


def spread(values: Sequence[float]) -> Spread:
    """:class:`Spread` of the non-NaN ``values``."""
    kept = _finite(values)
    if not kept:
        nan = float("nan")
        return Spread(0, nan, nan, nan, nan)
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else float("nan")
    return Spread(len(kept), float(np.mean(kept)), std, min(kept), max(kept))


@dataclass(frozen=True)
class Comparison:
    """A method against the reference on the cases both scored.

    Attributes:
        means: The method's mean per structure and :data:`OVERALL` over the paired cases.
        reference_means: The reference's means over the same cases.
        gaps: :func:`performance_gap` of ``means`` vs ``reference_means`` (percent).
        tests: :func:`wilcoxon_paired` per structure and on the per-case structure mean.
        shared_cases: Cases scored by both.
        same_cases: Whether both scored exactly the same cases (else the means shown elsewhere cover
            other cases than the comparison).
    """

    means: dict[str, float]
    reference_means: dict[str, float]
    gaps: dict[str, float]
    tests: dict[str, WilcoxonResult]
    shared_cases: int
    same_cases: bool


def compare_to_reference(table: CaseScores, reference: CaseScores, structures: Sequence[str]) -> Comparison:
    """Gap % and Wilcoxon test of ``table`` vs ``reference``, both restricted to the cases they share.

    Per structure the gap compares the two means over the paired cases; the overall gap compares the
    means over structures of those per-structure means.
    """
    means: dict[str, float] = {}
    reference_means: dict[str, float] = {}
    for structure in structures:
        _, a, b = paired_values(column(table, structure), column(reference, structure))
        means[structure] = float(a.mean()) if a.size else float("nan")
        reference_means[structure] = float(b.mean()) if b.size else float("nan")
    means[OVERALL] = nan_mean([means[s] for s in structures])
    reference_means[OVERALL] = nan_mean([reference_means[s] for s in structures])
    return Comparison(
        means, reference_means, performance_gaps(means, reference_means),
        wilcoxon_per_structure(table, reference, structures),
        len(set(table) & set(reference)), set(table) == set(reference),
    )


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values of one family of tests (None: no test, left out of the family).

    With the ``m`` p-values sorted ascending, ``p_adj(i) = max_{j<=i} min(1, (m - j) p_(j))``
    (step-down, monotone); reject where ``p_adj < alpha``.
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p))
    adjusted: list[float | None] = [None] * len(p_values)
    m, running = len(tested), 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted
