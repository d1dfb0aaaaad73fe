"""The two ATP regularisers: the parameter-ratio loss and the LoRA group lasso."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from atp_ray.masking import decoder_layers
from atp_ray.structures import Masks, PruningSpace, UnitKind

# Inside the square root so its gradient stays finite when a group is already all zero.
_NORM_EPS = 1e-12


def ratio_loss(kept_fraction: Tensor, target_kept_fraction: float) -> Tensor:
    """log(max(R, p) / min(R, p)): zero on target, symmetric in the log of the ratio."""
    return (torch.log(kept_fraction) - torch.log(torch.as_tensor(target_kept_fraction))).abs()


def _lora_weight(module: nn.Module, which: str, adapter: str) -> Tensor | None:
    """The LoRA A or B weight of a peft LoRA layer, or None if the module has no LoRA."""
    table = getattr(module, which, None)
    if not isinstance(table, nn.ModuleDict) or adapter not in table:
        return None
    return table[adapter].weight


def _row_squares(module: nn.Module, adapter: str, groups: int) -> Tensor | None:
    """Sum of squares of lora_B rows, split into ``groups`` equal consecutive blocks."""
    b = _lora_weight(module, "lora_B", adapter)  # [out_features, r]
    return None if b is None else b.pow(2).reshape(groups, -1).sum(1)


def _column_squares(module: nn.Module, adapter: str, groups: int) -> Tensor | None:
    """Sum of squares of lora_A columns, split into ``groups`` equal consecutive blocks."""
    a = _lora_weight(module, "lora_A", adapter)  # [r, in_features]
    return None if a is None else a.pow(2).sum(0).reshape(groups, -1).sum(1)


def _total(parts: list[Tensor | None], like: Tensor) -> Tensor:
    present = [p for p in parts if p is not None]
    return sum(present) if present else torch.zeros_like(like)


def lora_group_lasso(model: nn.Module, space: PruningSpace, masks: Masks, adapter: str = "default") -> Tensor:
    """Sum over removed units of the L2 norm of the LoRA weights that write into or read from them.

    A query head owns its lora_B rows of q_proj and lora_A columns of o_proj; a KV group
    owns its rows of k_proj/v_proj plus all its query heads; a query slot owns that
    head in every group; an MLP channel owns its lora_B rows of gate/up and lora_A column
    of down_proj. Kept units and projections without LoRA contribute nothing.
    """
    # Zeros on the masks' device: projections without LoRA must not add CPU tensors on a GPU.
    device = next(iter(masks.values())).device
    total = torch.zeros((), device=device)
    for index, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        kv_mask = space.kv_head_mask(masks, index).detach()
        heads = _total(
            [_row_squares(attn.q_proj, adapter, space.num_heads), _column_squares(attn.o_proj, adapter, space.num_heads)],
            torch.zeros(space.num_heads, device=device),
        ).reshape(space.num_kv_heads, space.queries_per_group)
        kv = _total(
            [_row_squares(attn.k_proj, adapter, space.num_kv_heads), _row_squares(attn.v_proj, adapter, space.num_kv_heads)],
            kv_mask,
        )
        group_norms = (kv + heads.sum(1) + _NORM_EPS).sqrt()
        total = total + ((1 - kv_mask) * group_norms).sum()
        slots = space.group(index, UnitKind.QUERY_SLOT)
        if slots is not None:
            slot_norms = (heads.sum(0) + _NORM_EPS).sqrt()
            total = total + ((1 - masks[slots].detach()) * slot_norms).sum()
        channel_mask = space.mlp_mask(masks, index).detach()
        channels = _total(
            [
                _row_squares(mlp.gate_proj, adapter, space.intermediate_size),
                _row_squares(mlp.up_proj, adapter, space.intermediate_size),
                _column_squares(mlp.down_proj, adapter, space.intermediate_size),
            ],
            channel_mask,
        )
        total = total + ((1 - channel_mask) * (channels + _NORM_EPS).sqrt()).sum()
    return total
