"""The budget controller on plain numbers: target anneal, multipliers, the freeze rule and check, state."""

from __future__ import annotations

import pytest
import torch

from atp_ray.training.budget import CONTROL_LOSS_DECAY, BudgetController


def _controller(**overrides) -> BudgetController:
    settings = dict(
        control_steps=10,
        control_cap=14,
        anneal_fraction=0.5,
        ratio_weight=5.0,
        lagrangian_lr=1.0,
        tolerance=0.01,
        patience=3,
        loss_ratio=1.2,
    )
    return BudgetController(0.4, **(settings | overrides))


def test_target_rises_linearly_over_the_anneal_then_holds():
    budget = _controller()  # anneal over 0.5 x 10 = 5 steps
    assert [budget.target(step) for step in range(7)] == pytest.approx([0.08, 0.16, 0.24, 0.32, 0.4, 0.4, 0.4])
    assert _controller(anneal_fraction=0.0).target(0) == 0.4


def test_multipliers_push_towards_the_budget_and_back():
    """Short of the target (too much kept) l1 falls, which makes cutting pay; past it, l1 rises."""
    budget = _controller(anneal_fraction=0.0)
    kept = torch.tensor(0.8, requires_grad=True)  # sparsity 0.2 for a 0.4 target
    loss, metrics = budget.loss(kept, step=0)
    assert metrics["lagrange_l1"] == 0.0 and metrics["control_target"] == 0.4
    l1, l2 = budget.multipliers.tolist()
    assert l1 == pytest.approx(-0.2) and l2 == pytest.approx(0.04)
    budget.loss(kept, step=1)
    loss, _ = budget.loss(kept, step=2)
    (pull,) = torch.autograd.grad(loss, kept)
    fixed = _controller(anneal_fraction=0.0, lagrangian_lr=0.0)
    (ratio_only,) = torch.autograd.grad(fixed.loss(kept, step=2)[0], kept)
    assert pull > ratio_only > 0  # keeping less lowers the loss, and the grown multipliers pull harder
    budget.multipliers.zero_()
    budget.loss(torch.tensor(0.5), step=3)  # sparsity 0.5, past the target
    assert budget.multipliers[0] == pytest.approx(0.1)


def test_budget_loss_is_the_ratio_term_while_the_multipliers_are_zero():
    budget = _controller(anneal_fraction=0.0, lagrangian_lr=0.0)
    kept = torch.tensor(0.7)
    loss, metrics = budget.loss(kept, step=0)
    assert float(loss) == pytest.approx(5.0 * metrics["ratio_loss"])
    assert budget.multipliers.tolist() == [0.0, 0.0]


def test_control_loss_is_an_ema_of_the_generator_losses():
    budget = _controller()
    assert budget.control_loss is None and not budget.checks_freeze
    budget.track_loss(2.0)
    budget.track_loss(4.0)
    assert budget.control_loss == pytest.approx(CONTROL_LOSS_DECAY * 2.0 + (1 - CONTROL_LOSS_DECAY) * 4.0)
    assert budget.checks_freeze
    assert not _controller(loss_ratio=None).checks_freeze


def test_early_freeze_needs_patience_steps_on_target():
    budget = _controller()
    assert [budget.freeze_due(step, 0.395) for step in (1, 2)] == [False, False]
    assert not budget.freeze_due(3, 0.2)  # off target: the count starts again
    assert [budget.freeze_due(step, 0.405) for step in (4, 5, 6)] == [False, False, True]


def test_end_of_control_freezes_a_reachable_mask_and_waits_for_a_short_one():
    budget = _controller(patience=100)
    assert not budget.freeze_due(9, 0.6)  # past the target, but control has not ended
    assert budget.freeze_due(10, 0.6)  # past the target at the end of control: freeze onto the target
    assert not budget.freeze_due(10, 0.2)  # short of it: the extension runs
    assert not budget.freeze_due(13, 0.2)
    assert budget.freeze_due(14, 0.2)  # the end of the extension freezes anyway


def test_a_freeze_cuts_at_most_the_tolerance_past_where_the_generator_stands():
    budget = _controller()
    assert budget.freeze_sparsity(0.6) == 0.4  # surplus units given back
    assert budget.freeze_sparsity(0.2) == pytest.approx(0.21)  # a short mask is not rescued
    assert budget.reachable(0.395) and not budget.reachable(0.3)


def test_freeze_check_postpones_a_costly_mask_until_the_extension_ends():
    budget = _controller()
    for step in (1, 2):
        budget.freeze_due(step, 0.4)
    assert budget.accepts_freeze(11, 1.1)
    assert not budget.accepts_freeze(11, 1.5)
    assert budget.steps_within_tolerance == 0  # an early freeze must hold the target anew
    assert budget.accepts_freeze(14, 1.5)  # the end of the extension: frozen anyway


def test_state_dict_round_trip_carries_every_control_value():
    budget = _controller()
    budget.loss(torch.tensor(0.8), step=0)
    budget.track_loss(3.0)
    budget.freeze_due(1, 0.4)
    state = budget.state_dict()
    restored = _controller()
    restored.load_state_dict(state)
    assert torch.equal(restored.multipliers, budget.multipliers)
    assert (restored.steps_within_tolerance, restored.control_loss) == (1, 3.0)
    budget.loss(torch.tensor(0.8), step=1)  # the saved state is a copy, not the live multipliers
    assert not torch.equal(state["multipliers"], budget.multipliers)
    # Resumed, it decides as the uninterrupted one does.
    assert [restored.freeze_due(s, 0.4) for s in (2, 3)] == [False, True]
