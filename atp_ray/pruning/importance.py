"""Importance criteria of the two-step baseline: score units once, keep the best, then tune.

A criterion is a small object with one method, chosen by name from :data:`IMPORTANCE`,
the registry that the run config's ``baseline.importance`` and the docs take their names from. Both criteria score exactly the units the
rest of the package prunes (atp_ray.models.layout says which weights each unit owns), and
:func:`importance_masks` cuts them with the uniform per-layer solver of
atp_ray.pruning.magnitude, so a baseline keeps the same number of parameters as an ATP run at
the same sparsity. Scores rank units within one kind of one layer only. ATP may start its
generator from them too (:func:`importance_prior`, ``atp.importance_prior``).

Both criteria read the weights one decoder layer at a time, through a ``gather`` context
that makes a list of parameters whole while it is open: a no-op where every process holds
the whole model, DeepSpeed's gather under ZeRO-3 (atp_ray.runtime.strategies), where each process
holds a shard. So scoring an 8B model sharded over four GPUs never holds more than one
layer of it whole.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from atp_ray.models.layout import Axis
from atp_ray.pruning.magnitude import layer_scores, uniform_masks, unit_scores
from atp_ray.pruning.structures import PruningSpace, UnitGroup, UnitKind

Batch = Mapping[str, Tensor]
# Makes the given parameters whole while the context is open (see the module docstring).
Gather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]


def already_whole(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """The gather of a process that holds every weight whole: nothing to do."""
    return contextlib.nullcontext()


class Importance(Protocol):
    """Scores every unit of a decoder; higher means more worth keeping."""

    summary: ClassVar[str]  # one line for the config's field description and the docs

    def score(
        self, model: nn.Module, space: PruningSpace, batches: Sequence[Batch], gather: Gather = already_whole
    ) -> list[dict[UnitKind, Tensor]]:
        """One ``{kind: scores[units]}`` per decoder layer, from the model and calibration batches."""
        ...


class MagnitudeImportance:
    """L2 norm of the weights a unit owns (LLM-Pruner's magnitude criterion); ignores the data."""

    summary = "weight L2 norm"

    def score(
        self, model: nn.Module, space: PruningSpace, batches: Sequence[Batch], gather: Gather = already_whole
    ) -> list[dict[UnitKind, Tensor]]:
        scores = []
        for layer in space.layout.layers(model):
            with gather(list(layer.parameters())):
                scores.append(layer_scores(layer, space))
        return scores


class TaylorImportance:
    """First-order Taylor, LLM-Pruner's element-wise form: sum of |w * dL/dw| over a unit's weights.

    dL/dw is the gradient of the mean causal-LM loss over the calibration batches. It is
    computed one decoder layer at a time, from the last to the first: one forward pass per
    batch, without a graph, records each layer's inputs and the loss's gradient at the
    last layer's output; then each layer, made whole, is run again from its recorded
    inputs and back-propagated, which gives its weights' gradients (summed over the
    batches before the product is taken) and the gradient at its input for the layer
    below. The chain rule is the same as one backward through the whole model, so the
    scores are too. The model's requires_grad flags and training mode are restored.
    """

    summary = "sum of |w * dL/dw|"

    def score(
        self, model: nn.Module, space: PruningSpace, batches: Sequence[Batch], gather: Gather = already_whole
    ) -> list[dict[UnitKind, Tensor]]:
        if not batches:
            raise ValueError("taylor importance needs at least one calibration batch (baseline.calibration_batches)")
        layers = space.layout.layers(model)
        flags = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        try:
            for p in flags:
                p.requires_grad_(False)
            model.eval()  # no dropout: the gradient of the model as it will be pruned
            passes = [_record_pass(model, layers, batch, len(batches), gather) for batch in batches]
            scores = [_layer_taylor(layer, space, passes, gather) for layer in reversed(layers)]
            return scores[::-1]
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.train(was_training)


@dataclass
class _LayerCall:
    """How one decoder layer was called in a recorded pass: its input hidden states (off the device) and the rest."""

    hidden: Tensor
    hidden_is_positional: bool
    args: tuple[Any, ...]  # the positional arguments after the hidden states
    kwargs: dict[str, Any]

    def run(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        """The layer's output hidden states when called as recorded, on ``hidden``."""
        if self.hidden_is_positional:
            out = layer(hidden, *self.args, **self.kwargs)
        else:
            out = layer(*self.args, hidden_states=hidden, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


@dataclass
class _Pass:
    """One calibration batch: the layer calls not yet replayed, and the loss's gradient at the next one's output."""

    calls: list[_LayerCall]
    grad: Tensor


def _record_pass(model: nn.Module, layers: nn.ModuleList, batch: Batch, batches: int, gather: Gather) -> _Pass:
    """A forward pass recording every layer's call, and the gradient of loss / ``batches`` at the last layer's output.

    No parameter requires grad and the last layer's output is replaced by a leaf that does,
    so the only graph built is the head's (final norm, LM head, loss).
    """
    calls: list[_LayerCall] = []
    head_input: list[Tensor] = []
    gathering = _GatheredWhileCalled(model, gather)

    def record(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            calls.append(_LayerCall(args[0].detach().cpu(), True, args[1:], kwargs))
        else:
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls.append(_LayerCall(kwargs["hidden_states"].detach().cpu(), False, (), rest))

    def cut_graph(layer: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        head_input.append(hidden.detach().requires_grad_())
        gathering.keep_open = True  # the head's weights are read again by its backward
        return (head_input[0], *output[1:]) if isinstance(output, tuple) else head_input[0]

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(cut_graph))
    try:
        with gathering, torch.enable_grad():
            (model(**batch, use_cache=False).loss.float() / batches).backward()
    finally:
        for handle in handles:
            handle.remove()
    return _Pass(calls, head_input[0].grad)


class _GatheredWhileCalled:
    """A context in which each module's own parameters are whole while it runs.

    Once ``keep_open`` is set, the modules that run from then on stay whole until the
    context exits: their backward reads them again.
    """

    def __init__(self, model: nn.Module, gather: Gather):
        self.model, self.gather = model, gather
        self.keep_open = False
        self.kept = contextlib.ExitStack()
        self.running: dict[nn.Module, list[contextlib.ExitStack]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> None:
        for module in self.model.modules():
            if next(module.parameters(recurse=False), None) is not None:
                self.handles.append(module.register_forward_pre_hook(self._enter_module))
                self.handles.append(module.register_forward_hook(self._leave_module))

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.kept.close()

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(self.gather(list(module.parameters(recurse=False))))
        self.running.setdefault(module, []).append(stack)

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self.running[module].pop()
        if self.keep_open:
            self.kept.push(stack)
        else:
            stack.close()


def _layer_taylor(layer: nn.Module, space: PruningSpace, passes: list[_Pass], gather: Gather) -> dict[UnitKind, Tensor]:
    """The Taylor scores of the last layer not yet replayed; moves each pass's gradient to that layer's input."""
    owned = [piece.module(layer).weight for pieces in space.layout.slices.values() for piece in pieces]
    with gather(list(layer.parameters())):
        try:
            for w in owned:
                w.requires_grad_(True)
                w.grad = None
            for recorded in passes:
                call = recorded.calls.pop()
                hidden = call.hidden.to(recorded.grad.device).requires_grad_()
                with torch.enable_grad():
                    torch.autograd.backward(call.run(layer, hidden), recorded.grad)
                recorded.grad = hidden.grad
            with torch.no_grad():
                return unit_scores(layer, space, _taylor_values)
        finally:
            for w in owned:
                w.grad = None
                w.requires_grad_(False)


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
    gather: Gather = already_whole,
    protected: Mapping[UnitGroup, Tensor] | None = None,
) -> dict[UnitGroup, Tensor]:
    """The two-step baseline's hard mask: ``sparsity`` removed, lowest-importance units first, uniform per layer.

    ``protected`` units (atp_ray.pruning.critical) rank above every other unit of their layer;
    the uniform shape still keeps the same number of each kind in every layer.
    """
    scores = importance.score(model, space, batches, gather)
    for group, keep in (protected or {}).items():
        layer = scores[group.layer]
        layer[group.kind] = layer[group.kind].masked_fill(keep.to(layer[group.kind].device), math.inf)
    return uniform_masks(space, scores, sparsity, channel_multiple)


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
