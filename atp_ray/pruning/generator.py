"""The pruning-decision generator: one logit per prunable unit, turned into hard masks.

A fixed, orthogonally initialised code per decoder layer goes through a small transformer
encoder over the layer axis, so that decisions of different layers can inform each other;
one bias-free linear head per (layer, unit kind) maps to that group's unit count. Only
those heads depend on the model's shape, so one design serves any model size.

An elastic run's generator also reads its sparsity budget: the budget moves every layer's
encoded state along two learned directions (by the budget and by its square), so each
unit's logit is a quadratic in the budget and one generator emits a mask for each size
(see docs/method.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from atp_ray.pruning.structures import ATTENTION_KINDS, Masks, PruningSpace, UnitGroup


def binarize(
    logits: Tensor, *, temperature: float, base: float, stochastic: bool, generator: torch.Generator | None = None
) -> Tensor:
    """Hard 0/1 mask from logits with a straight-through gradient.

    soft = sigmoid((logit + noise + base) / temperature), where noise is logistic
    (Gumbel-sigmoid) when ``stochastic`` and zero otherwise; the forward value is
    soft > 0.5, the backward gradient is the soft one. At least one unit is always kept
    (the most confident), so a layer never loses all heads or all channels.
    """
    if stochastic:
        u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-6, 1 - 1e-6)
        logits = logits + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + base) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    if hard.sum() == 0:
        hard = torch.zeros_like(hard)
        hard[soft.argmax()] = 1.0
    return _StraightThrough.apply(soft, hard)


class _StraightThrough(torch.autograd.Function):
    """Forward the hard values exactly; send the gradient to the soft ones unchanged."""

    @staticmethod
    def forward(ctx, soft: Tensor, hard: Tensor) -> Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class PruningGenerator(nn.Module):
    """Emits masks for a :class:`PruningSpace`: stochastic in training, deterministic in eval."""

    def __init__(
        self,
        space: PruningSpace,
        *,
        width: int = 64,
        num_heads: int = 4,
        num_encoder_layers: int = 2,
        temperature: float = 0.4,
        base: float = 3.0,
        prior: Mapping[UnitGroup, Tensor] | None = None,
        protected: Mapping[UnitGroup, Tensor] | None = None,
        budgets: tuple[float, ...] | None = None,
    ):
        super().__init__()
        self.space = space
        self.temperature = temperature
        self.base = base
        codes = torch.empty(space.num_layers, width)
        nn.init.orthogonal_(codes)
        # A fixed input: trainable codes would let the generator memorise without the encoder.
        self.register_buffer("layer_codes", codes)
        self.conditioned = budgets is not None
        if self.conditioned:
            # Zero at first, so every budget starts from the same decisions (and no random draw
            # is added: a single run's stream stays as it was). Budgets enter scaled to [-1, 1]
            # over their range. Added before the encoder instead, the shift barely moved the
            # logits; with the linear term alone, three budgets could not all be met (tiny model:
            # 0.0 / 0.31 / 0.61 for 0.2 / 0.4 / 0.6, against 0.15 / 0.37 / 0.62 with the square).
            self.budget_directions = nn.Parameter(torch.zeros(2, width))
            low, high = min(budgets), max(budgets)
            self.register_buffer("budget_centre", torch.tensor((low + high) / 2))
            self.register_buffer("budget_half_range", torch.tensor(max(high - low, 1e-6) / 2))
        block = nn.TransformerEncoderLayer(
            width, num_heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(block, num_encoder_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({_head_key(g): nn.Linear(width, g.size, bias=False) for g in space.groups})
        # A fixed offset per unit (an importance ranking to start from), saved with the weights.
        self.has_prior = prior is not None
        for group, offsets in (prior or {}).items():
            self.register_buffer(f"prior_{_head_key(group)}", offsets.detach().clone())
        # Units every mask keeps (atp_ray.pruning.critical): their logit is +inf, noise or not.
        self.has_protected = protected is not None
        for group, keep in (protected or {}).items():
            self.register_buffer(f"protected_{_head_key(group)}", keep.detach().to(torch.bool).clone())

    def logits(self, budget: float | None = None) -> dict[UnitGroup, Tensor]:
        """One logit per unit, keyed by unit group; a conditioned generator's at sparsity ``budget``.

        A protected unit's logit is +inf: it is kept by every mask, sampled or not, at any budget.
        """
        hidden = self.norm(self.encoder(self.layer_codes.unsqueeze(0)).squeeze(0))  # [layers, width]
        if self.conditioned != (budget is not None):
            want = "a sparsity budget" if self.conditioned else "no budget (it was built for one)"
            raise ValueError(f"this generator takes {want}")
        if budget is not None:  # along two learned directions, by the budget scaled to [-1, 1] and its square
            scaled = (budget - self.budget_centre) / self.budget_half_range
            # The square is centred on its mean over [-1, 1], so the two directions start independent.
            hidden = hidden + torch.stack([scaled, scaled**2 - 1 / 3]) @ self.budget_directions
        logits = {g: self.heads[_head_key(g)](hidden[g.layer]) for g in self.space.groups}
        if self.has_prior:
            logits = {g: logit + getattr(self, f"prior_{_head_key(g)}") for g, logit in logits.items()}
        if self.has_protected:
            # masked_fill sends no gradient to a protected logit, and sigmoid(inf) is exactly 1.
            logits = {g: logit.masked_fill(getattr(self, f"protected_{_head_key(g)}"), math.inf) for g, logit in logits.items()}
        return logits

    def forward(
        self, generator: torch.Generator | None = None, budget: float | None = None, offset: Offset = 0.0
    ) -> dict[UnitGroup, Tensor]:
        """Hard masks with straight-through gradients; noisy only in training mode.

        ``offset`` is added to the logits (a higher one keeps more units): one for all, or one
        per unit group (see ``offsets_for_sparsity``).
        """
        return {
            g: binarize(
                logit + _offset_of(offset, g),
                temperature=self.temperature,
                base=self.base,
                stochastic=self.training,
                generator=generator,
            )
            for g, logit in self.logits(budget).items()
        }

    @torch.no_grad()
    def deterministic_masks(self, budget: float | None = None, offset: Offset = 0.0) -> dict[UnitGroup, Tensor]:
        """The noise-free hard mask (the logits shifted by ``offset``)."""
        return _shifted_masks(self.logits(budget), offset, self.temperature, self.base)

    @torch.no_grad()
    def offsets_for_sparsity(self, sparsity: float, budget: float | None = None) -> dict[UnitGroup, float]:
        """Per unit group, the offset that puts the noise-free mask's attention and its MLP each at ``sparsity``.

        One offset for the attention's units and one for the MLP's, each found by bisection:
        the ranking within each part is the generator's, the split between them is fixed. The
        MLP, finer-grained, takes up the attention's rounding, so the whole mask meets ``sparsity``.
        """
        logits = self.logits(budget)
        # Each bisection binarizes only its own part's units.
        attention_logits = {g: logit for g, logit in logits.items() if g.kind in ATTENTION_KINDS}
        mlp_logits = {g: logit for g, logit in logits.items() if g not in attention_logits}
        attention_offset = self._offset(
            attention_logits, sparsity, lambda masks: self.space.part_sparsity(masks, ATTENTION_KINDS)
        )
        attention = _shifted_masks(attention_logits, attention_offset, self.temperature, self.base)
        mlp_offset = self._offset(mlp_logits, sparsity, lambda masks: self.space.sparsity({**masks, **attention}))
        return {g: attention_offset if g in attention_logits else mlp_offset for g in logits}

    @torch.no_grad()
    def masks_at_sparsity(
        self, sparsity: float, *, budget: float | None = None, within: Masks | None = None, by_part: bool = False
    ) -> dict[UnitGroup, Tensor]:
        """The noise-free mask whose sparsity is closest to ``sparsity``: the one frozen and exported.

        The generator's noise-free decisions drift from the budget that its noisy samples
        were trained to meet; one offset for all logits, found by bisection, keeps its ranking of
        units and hits the budget up to the granularity of one unit. ``within`` (a mask of a
        smaller budget) nests the result: a unit it cuts stays cut. ``by_part`` cuts the
        attention and the MLP each at ``sparsity`` instead (``offsets_for_sparsity``).
        """
        if by_part:
            if within is not None:
                raise ValueError("a cut by part is not nested: it serves runs of one budget")
            return self.deterministic_masks(budget, self.offsets_for_sparsity(sparsity, budget))
        logits = self.logits(budget)
        if within is not None:
            logits = {g: logit.masked_fill(within[g] == 0, -math.inf) for g, logit in logits.items()}
        offset = self._offset(logits, sparsity, self.space.sparsity)
        return _shifted_masks(logits, offset, self.temperature, self.base)

    def _offset(
        self, logits: dict[UnitGroup, Tensor], sparsity: float, measure: Callable[[Masks], float], iterations: int = 40
    ) -> float:
        """The offset of all ``logits`` whose noise-free mask's ``measure`` is closest to ``sparsity``."""

        def sparsity_at(offset: float) -> float:
            return measure(_shifted_masks(logits, offset, self.temperature, self.base))

        low, high = -_OFFSET_RANGE, _OFFSET_RANGE  # a higher offset keeps more units
        for _ in range(iterations):
            middle = (low + high) / 2
            if sparsity_at(middle) > sparsity:
                low = middle
            else:
                high = middle
        return min((low, high), key=lambda offset: abs(sparsity_at(offset) - sparsity))


# One logit offset for every unit, or one per unit group.
Offset = float | Mapping[UnitGroup, float]


def _offset_of(offset: Offset, group: UnitGroup) -> float:
    return offset[group] if isinstance(offset, Mapping) else offset


def _shifted_masks(
    logits: dict[UnitGroup, Tensor], offset: Offset, temperature: float, base: float
) -> dict[UnitGroup, Tensor]:
    return {
        g: binarize(logit + _offset_of(offset, g), temperature=temperature, base=base, stochastic=False)
        for g, logit in logits.items()
    }


# Logit shifts searched when matching a budget; beyond it every unit is kept or cut.
_OFFSET_RANGE = 100.0


def _head_key(group: UnitGroup) -> str:
    # ModuleDict keys may not contain dots.
    return f"layer{group.layer}_{group.kind.value}"


def detach_masks(masks: Masks) -> dict[UnitGroup, Tensor]:
    """Hard masks without their graph, for steps that must not train the generator."""
    return {g: m.detach() for g, m in masks.items()}
