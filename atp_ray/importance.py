"""Importance criteria of the two-step baseline: score units once, keep the best, then tune.

A criterion is a small object with one method, chosen by name from :data:`IMPORTANCE`
(the run config's ``baseline.importance``). Both criteria score exactly the units the
rest of the package prunes (atp_ray.layout says which weights each unit owns), and
:func:`importance_masks` cuts them with the uniform per-layer solver of
atp_ray.magnitude, so a baseline keeps the same number of parameters as an ATP run at
the same sparsity. Scores rank units within one kind of one layer only. ATP may start its
generator from them too (:func:`importance_prior`, ``atp.importance_prior``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from atp_ray.layout import Axis
from atp_ray.magnitude import layer_scores, uniform_masks, unit_scores
from atp_ray.structures import PruningSpace, UnitGroup, UnitKind

Batch = Mapping[str, Tensor]


class Importance(Protocol):
    """Scores every unit of a decoder; higher means more worth keeping."""

    def score(self, model: nn.Module, space: PruningSpace, batches: Sequence[Batch]) -> list[dict[UnitKind, Tensor]]:
        """One ``{kind: scores[units]}`` per decoder layer, from the model and calibration batches."""
        ...


class MagnitudeImportance:
    """L2 norm of the weights a unit owns (LLM-Pruner's magnitude criterion); ignores the data."""

    def score(self, model: nn.Module, space: PruningSpace, batches: Sequence[Batch]) -> list[dict[UnitKind, Tensor]]:
        return [layer_scores(layer, space) for layer in space.layout.layers(model)]


class TaylorImportance:
    """First-order Taylor, LLM-Pruner's element-wise form: sum of |w * dL/dw| over a unit's weights.

    dL/dw is the gradient of the mean causal-LM loss over the calibration batches. Only
    the projection weights units own get gradients, and their previous requires_grad
    flags and .grad are restored afterwards, so the model leaves as it came.
    """

    def score(self, model: nn.Module, space: PruningSpace, batches: Sequence[Batch]) -> list[dict[UnitKind, Tensor]]:
        if not batches:
            raise ValueError("taylor importance needs at least one calibration batch (baseline.calibration_batches)")
        layers = space.layout.layers(model)
        owned = [piece.module(layer).weight for layer in layers for pieces in space.layout.slices.values() for piece in pieces]
        flags = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        try:
            for p in flags:
                p.requires_grad_(False)
            for w in owned:
                w.requires_grad_(True)
                w.grad = None
            model.eval()  # no dropout: the gradient of the model as it will be pruned
            for batch in batches:
                (model(**batch).loss.float() / len(batches)).backward()
            with torch.no_grad():
                return [unit_scores(layer, space, _taylor_values) for layer in layers]
        finally:
            for w in owned:
                w.grad = None
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.train(was_training)


def _taylor_values(module: nn.Module, axis: Axis) -> Tensor:
    weight = module.weight
    return (weight.float() * weight.grad.float()).abs()


IMPORTANCE: dict[str, Importance] = {"magnitude": MagnitudeImportance(), "taylor": TaylorImportance()}


def importance_masks(
    model: nn.Module,
    space: PruningSpace,
    sparsity: float,
    importance: Importance,
    batches: Sequence[Batch],
    channel_multiple: int = 1,
) -> dict[UnitGroup, Tensor]:
    """The two-step baseline's hard mask: ``sparsity`` removed, lowest-importance units first, uniform per layer."""
    return uniform_masks(space, importance.score(model, space, batches), sparsity, channel_multiple)


def importance_prior(space: PruningSpace, scores: Sequence[Mapping[UnitKind, Tensor]], scale: float) -> dict[UnitGroup, Tensor]:
    """Logit offsets that rank each group's units as ``scores`` do: ``scale`` x the standardised log score.

    Scores are comparable only within one kind of one layer, so each group is standardised on
    its own (a group of one unit gets 0); the generator still learns how much to cut per layer.
    """
    prior = {}
    for group in space.groups:
        log_scores = torch.log(scores[group.layer][group.kind].float() + 1e-12)
        if group.size == 1:
            prior[group] = torch.zeros_like(log_scores)
            continue
        prior[group] = scale * (log_scores - log_scores.mean()) / (log_scores.std() + 1e-6)
    return prior
