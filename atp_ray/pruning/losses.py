"""The two ATP regularisers: the parameter-ratio loss and the LoRA group lasso."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from atp_ray.models.layout import Axis, Role
from atp_ray.pruning.structures import Masks, PruningSpace, UnitKind

# Inside the square root so its gradient stays finite when a group is already all zero.
_NORM_EPS = 1e-12


def ratio_loss(kept_fraction: Tensor, target_kept_fraction: float) -> Tensor:
    """log(max(R, p) / min(R, p)): zero on target, symmetric in the log of the ratio."""
    return (torch.log(kept_fraction) - torch.log(torch.as_tensor(target_kept_fraction))).abs()


def _lora_squares(adapter: str):
    """Squared LoRA weights a unit owns: lora_B rows of a projection it writes, lora_A columns of one it reads."""

    def values(module: nn.Module, axis: Axis) -> Tensor | None:
        table = getattr(module, "lora_B" if axis is Axis.ROWS else "lora_A", None)
        if not isinstance(table, nn.ModuleDict) or adapter not in table:
            return None  # a projection without LoRA contributes nothing
        return table[adapter].weight.pow(2)

    return values


def _or_zeros(value: Tensor | None, size: int, device: torch.device) -> Tensor:
    return value if value is not None else torch.zeros(size, device=device)


def _lora_device(model: nn.Module, adapter: str) -> torch.device:
    """Where the LoRA weights live: the zeros standing in for skipped projections must be there too."""
    for name, param in model.named_parameters():
        if "lora_" in name and f".{adapter}." in name:
            return param.device
    return torch.device("cpu")


def lora_group_lasso(model: nn.Module, space: PruningSpace, masks: Masks, adapter: str = "default") -> Tensor:
    """Sum over removed units of the L2 norm of the LoRA weights that write into or read from them.

    A query head owns its lora_B rows of q_proj and lora_A columns of o_proj; a KV group
    owns its rows of k_proj/v_proj plus all its query heads; a query slot owns that
    head in every group; an MLP channel owns its lora_B rows of gate/up and lora_A column
    of down_proj (see atp_ray.models.layout). Kept units and projections without LoRA contribute nothing.
    """
    layout, values = space.layout, _lora_squares(adapter)
    device = _lora_device(model, adapter)
    total = torch.zeros((), device=device)
    for index, layer in enumerate(layout.layers(model)):
        heads = _or_zeros(layout.role_sums(layer, Role.QUERY_HEAD, space.num_heads, values), space.num_heads, device)
        heads = heads.reshape(space.num_kv_heads, space.queries_per_group)
        kv = _or_zeros(layout.role_sums(layer, Role.KV_HEAD, space.num_kv_heads, values), space.num_kv_heads, device)
        kv_mask = space.kv_head_mask(masks, index).detach()
        group_norms = (kv + heads.sum(1) + _NORM_EPS).sqrt()
        total = total + ((1 - kv_mask) * group_norms).sum()
        slots = space.group(index, UnitKind.QUERY_SLOT)
        if slots is not None:
            slot_norms = (heads.sum(0) + _NORM_EPS).sqrt()
            total = total + ((1 - masks[slots].detach()) * slot_norms).sum()
        channel_mask = space.mlp_mask(masks, index).detach()
        channels = layout.role_sums(layer, Role.MLP_CHANNEL, space.intermediate_size, values)
        channels = _or_zeros(channels, space.intermediate_size, device)
        total = total + ((1 - channel_mask) * (channels + _NORM_EPS).sqrt()).sum()
    return total
