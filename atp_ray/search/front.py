"""The Pareto front and its hypervolume, on plain arrays (no Ray, no trials).

Every function takes ``values`` of shape ``[n_points, n_objectives]`` and one mode per
objective, ``"min"`` or ``"max"``. A point is one trial's model, or, for an elastic trial (one
pruned model per sparsity budget), one of its budgets: the front is over points, so an
elastic trial may put several of its models on it. A row with any NaN (a trial that has not
finished, failed or was stopped before reporting) is never on the front and adds no hypervolume. The dominance test
and the hypervolume come from moocore (exact algorithms, maintained); this module only handles
the modes, the NaN rows and the reference point.
"""

from __future__ import annotations

from collections.abc import Sequence

import moocore
import numpy as np

__all__ = ["pareto_mask", "pareto_ranks", "hypervolume", "reference_point", "hypervolume_history"]

MODES = ("min", "max")


def _check(values: np.ndarray, modes: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
    """Validate shapes and modes; return the values as float and moocore's ``maximise`` flags."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"values: expected a 2-D array [n_trials, n_objectives], got shape {values.shape}")
    if len(modes) != values.shape[1]:
        raise ValueError(f"modes: expected one mode per objective ({values.shape[1]}), got {list(modes)}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes: each must be one of {MODES}, got {bad}")
    return values, [m == "max" for m in modes]


def _finite_rows(values: np.ndarray) -> np.ndarray:
    return ~np.isnan(values).any(axis=1)


def pareto_mask(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows.

    A row is on the front when no other row is at least as good in every objective and
    strictly better in one. Identical rows do not dominate each other, so duplicates of a
    front point are all on the front. Rows with a NaN are never on it.
    """
    values, maximise = _check(values, modes)
    mask = np.zeros(len(values), dtype=bool)
    finite = _finite_rows(values)
    if finite.any():
        mask[finite] = moocore.is_nondominated(values[finite], maximise=maximise, keep_weakly=True)
    return mask


def pareto_ranks(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Non-dominated sorting: 0 for the front, 1 for the front of what remains, and so on.

    Rows with a NaN get one rank more than the worst finite row, so they sort last.
    """
    values, maximise = _check(values, modes)
    ranks = np.zeros(len(values), dtype=int)
    finite = _finite_rows(values)
    if finite.any():
        ranks[finite] = moocore.pareto_rank(values[finite], maximise=maximise)
    ranks[~finite] = ranks[finite].max() + 1 if finite.any() else 0
    return ranks


def hypervolume(values: np.ndarray, modes: Sequence[str], reference: Sequence[float]) -> float:
    """Volume of objective space dominated by the rows and bounded by ``reference``.

    ``reference`` is a point worse than every interesting trial (see ``reference_point``);
    a row that is not strictly better than it in every objective adds nothing. NaN rows
    are ignored; no finite row gives 0.
    """
    values, maximise = _check(values, modes)
    reference = np.asarray(reference, dtype=float)
    if reference.shape != (values.shape[1],) or not np.isfinite(reference).all():
        raise ValueError(f"reference: expected {values.shape[1]} finite numbers, got {reference.tolist()}")
    finite = values[_finite_rows(values)]
    if len(finite) == 0:
        return 0.0
    return float(moocore.hypervolume(finite, ref=reference, maximise=maximise))


def reference_point(values: np.ndarray, modes: Sequence[str], margin: float = 0.1) -> np.ndarray:
    """The reference point used when the search space names none.

    Rule, per objective over the finite rows: take the worst value (the largest for "min",
    the smallest for "max") and move it further in the bad direction by ``margin`` times the
    objective's range (max - min), so that the worst trials still add a sliver of volume.
    When the range is 0 (one trial, or all equal) the step is ``margin * |worst|``, or
    ``margin`` itself when the worst value is 0. The point depends on the trials seen, so a
    hypervolume is comparable across searches only with the same, explicit reference.
    """
    values, maximise = _check(values, modes)
    if margin < 0:
        raise ValueError(f"margin: must be >= 0, got {margin}")
    finite = values[_finite_rows(values)]
    if len(finite) == 0:
        raise ValueError("values: no row without NaN, so there is no reference point to derive")
    low, high = finite.min(axis=0), finite.max(axis=0)
    worst = np.where(maximise, low, high)
    span = high - low
    span = np.where(span > 0, span, np.where(worst != 0, np.abs(worst), 1.0))
    direction = np.where(maximise, -1.0, 1.0)
    return worst + direction * margin * span


def hypervolume_history(
    values: np.ndarray, modes: Sequence[str], reference: Sequence[float], groups: Sequence | None = None
) -> np.ndarray:
    """Hypervolume after each trial, in trial order.

    Without ``groups`` each row is a trial: entry ``i`` is the hypervolume of rows ``0..i``.
    With ``groups`` (one trial label per row; an elastic trial has a row per budget) there is
    one entry per distinct label, in order of first appearance: the hypervolume of every row
    whose trial came at or before it. A NaN row (not completed) adds nothing, so the curve is
    flat there and never decreases.
    """
    values, _ = _check(values, modes)
    if groups is None:
        return np.array([hypervolume(values[: i + 1], modes, reference) for i in range(len(values))])
    if len(groups) != len(values):
        raise ValueError(f"groups: expected one label per row ({len(values)}), got {len(groups)}")
    order = {label: i for i, label in enumerate(dict.fromkeys(groups))}  # first appearance
    position = np.array([order[label] for label in groups], dtype=int)
    return np.array([hypervolume(values[position <= i], modes, reference) for i in range(len(order))])
