"""The pruning space and what acts on it: no training loop, no run config, no Ray.

``structures`` (unit groups, the :class:`~atp_ray.pruning.structures.PruningSpace`, masks),
``generator`` (the learned mask generator), ``masking`` (masks applied as forward hooks),
``losses`` (ratio and group-lasso losses), ``widths`` (hardware-friendly widths),
``magnitude`` and ``importance`` (the two-step baseline's one-shot criteria). Where a family
keeps each unit's weights is :mod:`atp_ray.models.layout`.
"""
