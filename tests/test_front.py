"""Pareto front and hypervolume on points checked by hand."""

import numpy as np
import pytest

from atp_ray.search.front import hypervolume, hypervolume_history, pareto_mask, pareto_ranks, reference_point

# Two objectives, both minimised. Drawn on paper:
#   a (1, 5), b (2, 2), c (3, 3) dominated by b, d (5, 1), e (2, 2) duplicate of b, f NaN.
POINTS = np.array([[1, 5], [2, 2], [3, 3], [5, 1], [2, 2], [np.nan, 0]], dtype=float)
MIN_MIN = ["min", "min"]


def test_pareto_mask_keeps_non_dominated_and_duplicates_drops_nan():
    assert pareto_mask(POINTS, MIN_MIN).tolist() == [True, True, False, True, True, False]


def test_pareto_mask_respects_max_mode():
    # Maximising the second objective: a (1, 5) dominates every other point.
    assert pareto_mask(POINTS, ["min", "max"]).tolist() == [True, False, False, False, False, False]


def test_pareto_ranks_sort_fronts_and_put_nan_last():
    assert pareto_ranks(POINTS, MIN_MIN).tolist() == [0, 0, 1, 0, 0, 2]


def test_hypervolume_of_hand_checked_staircase():
    # Reference (6, 6). Sweep x: a covers [1,2)x[5,6) = 1; b covers [2,5)x[2,6) = 12;
    # d covers [5,6)x[1,6) = 5. c, the duplicate and the NaN row add nothing. Total 18.
    assert hypervolume(POINTS, MIN_MIN, [6, 6]) == pytest.approx(18.0)


def test_hypervolume_with_a_maximised_objective():
    # Accuracy (max) against size (min): (0.8, 4) and (0.6, 2), reference (0.5, 5).
    # Sweep size: [2,4) x (0.6-0.5) = 0.2 and [4,5) x (0.8-0.5) = 0.3. Total 0.5.
    values = np.array([[0.8, 4.0], [0.6, 2.0]])
    assert hypervolume(values, ["max", "min"], [0.5, 5.0]) == pytest.approx(0.5)


def test_hypervolume_ignores_points_beyond_the_reference_and_empty_sets():
    assert hypervolume(np.array([[7.0, 1.0]]), MIN_MIN, [6, 6]) == 0.0
    assert hypervolume(np.full((2, 2), np.nan), MIN_MIN, [6, 6]) == 0.0


def test_reference_point_is_worst_plus_margin_of_range():
    # Finite rows span x in [1, 5] and y in [1, 5]: worst 5 + 0.1 * 4 on both.
    assert reference_point(POINTS, MIN_MIN).tolist() == pytest.approx([5.4, 5.4])
    # Maximised y: worst is the smallest, 1, pushed down to 0.6.
    assert reference_point(POINTS, ["min", "max"]).tolist() == pytest.approx([5.4, 0.6])
    # A single trial has no range: the step is margin * |worst| (or margin when worst is 0).
    assert reference_point(np.array([[10.0, 0.0]]), MIN_MIN).tolist() == pytest.approx([11.0, 0.1])


def test_hypervolume_history_grows_per_trial_and_is_flat_on_nan():
    history = hypervolume_history(POINTS, MIN_MIN, [6, 6])
    # a alone: 5 x 1 = 5; + b: 1 + 4 x 4 = 17; c adds nothing; + d: 18; duplicate, NaN: 18.
    assert history.tolist() == pytest.approx([5.0, 17.0, 17.0, 18.0, 18.0, 18.0])


@pytest.mark.parametrize(
    "values, modes, match",
    [
        (np.zeros(3), MIN_MIN, "2-D"),
        (np.zeros((2, 2)), ["min"], "one mode per objective"),
        (np.zeros((2, 2)), ["min", "best"], "must be one of"),
    ],
)
def test_bad_input_names_the_field(values, modes, match):
    with pytest.raises(ValueError, match=match):
        pareto_mask(values, modes)


def test_bad_reference_is_rejected():
    with pytest.raises(ValueError, match="reference"):
        hypervolume(POINTS, MIN_MIN, [6.0])


def test_hypervolume_history_of_trials_with_several_points_counts_each_trial_once():
    # Trial x holds a and c, trial y holds b and d (an elastic trial has a point per budget);
    # the duplicate e and the NaN row belong to a third trial z.
    groups = ["x", "y", "x", "y", "z", "z"]
    history = hypervolume_history(POINTS, MIN_MIN, [6, 6], groups=groups)
    # x: a and c: 5 + (6-3) x (5-3) = 11; + y (b, d): 18; z adds nothing.
    assert history.tolist() == pytest.approx([11.0, 18.0, 18.0])
    with pytest.raises(ValueError, match="groups"):
        hypervolume_history(POINTS, MIN_MIN, [6, 6], groups=["x"])
