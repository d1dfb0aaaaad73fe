"""Logit distillation for the LoRA step: the masked model learns the next-token distribution of a teacher.

The teacher is the model being trained, run once more without a second copy of the base weights:

* ``inplace``  the same weights with the mask off and the current LoRA (the full network
               teaching its sub-network, as in slimmable / once-for-all networks);
* ``dense``    the untuned dense base model: the mask off and LoRA disabled (peft's
               ``disable_adapter``), so the student is pulled towards what it started from;
* ``tuned``    the base model wearing a finished dense LoRA run's adapter, loaded beside the
               trained one (:func:`attach_tuned_teacher`) and picked for the teacher's rows by
               peft's per-sample ``adapter_names``: a domain-tuned teacher that the student's
               updates cannot move, for the price of one more (small) adapter.

Each teacher's forward runs under ``torch.no_grad`` in eval mode (no dropout): it
builds no autograd graph, adds no trainable parameter and leaves the model's modes as it found them.
It must run outside any ``masked`` context, since the mask hooks would mask it too.

The loss is ``T^2 * KL(teacher_T || student_T)``, averaged over the target tokens (those
whose label is not ignored), with ``_T`` the softmax at temperature ``T``; the ``T^2``
keeps its gradient's scale independent of ``T`` (Hinton et al.). With ``top_k`` the
teacher's distribution is restricted to its ``k`` most likely tokens and renormalised there,
and the student's full-vocabulary log-probabilities are read on that support. A fixed
teacher's top-k logits can also come precomputed (:class:`TopLogits`, from
atp_ray.training.teacher_cache): the same loss without the teacher's forward.
Plain PyTorch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from atp_ray.data.batches import IGNORE_INDEX

__all__ = [
    "TEACHERS",
    "TEACHER_ADAPTER",
    "TopLogits",
    "attach_tuned_teacher",
    "distillation_loss",
    "teacher_logits",
    "top_logits",
]

# The name of the tuned teacher's adapter beside the trained one (peft's "default").
TEACHER_ADAPTER = "teacher"


def _inplace(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return model(**inputs).logits


def _dense(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    with model.disable_adapter():  # a peft model: the base weights alone
        return model(**inputs).logits


def _tuned(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    # Per-sample adapter selection leaves the active adapter and every requires_grad untouched.
    return model(**inputs, adapter_names=[TEACHER_ADAPTER] * len(inputs["input_ids"])).logits


class TopLogits(NamedTuple):
    """A teacher's ``k`` largest next-token logits per position and their token ids, ``[batch, seq, k]`` each."""

    values: Tensor
    indices: Tensor


def top_logits(logits: Tensor, k: int) -> TopLogits:
    """The ``k`` largest of ``logits`` ``[batch, seq, vocab]`` per position, in fp32 (raw: any temperature applies)."""
    values, indices = logits.float().topk(k, dim=-1)
    return TopLogits(values, indices)


# teacher name (config distill.teacher) -> the teacher's logits on the inputs, given the model being trained.
TEACHERS: dict[str, Callable[[nn.Module, dict[str, Tensor]], Tensor]] = {
    "inplace": _inplace,
    "dense": _dense,
    "tuned": _tuned,
}


def attach_tuned_teacher(model: nn.Module, adapter_dir: Path) -> None:
    """Load the peft adapter in ``adapter_dir`` into ``model`` as the frozen ``TEACHER_ADAPTER``.

    The trained adapter stays the active one; the teacher's weights get no gradient and are
    not trained parameters (collect those after this call). The random streams are left as
    they were (peft initialises the new layers before loading them), so a run draws the same
    masks and dropout with or without this teacher.
    """
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        model.load_adapter(str(adapter_dir), adapter_name=TEACHER_ADAPTER, is_trainable=False)


@torch.no_grad()
def teacher_logits(model: nn.Module, batch: dict[str, Tensor], teacher: str) -> Tensor:
    """The ``teacher``'s next-token logits on ``batch``, ``[batch, seq, vocab]``, without an autograd graph.

    Runs ``model`` in eval mode (no LoRA dropout) and restores each module's mode after.
    Call it outside ``masked``: the teacher is the unmasked model.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        # Without labels: the teacher's own loss would be computed for nothing.
        return TEACHERS[teacher](model, {k: v for k, v in batch.items() if k != "labels"})
    finally:
        for module, training in modes.items():
            module.training = training


def distillation_loss(
    student_logits: Tensor,
    teacher: Tensor | TopLogits,
    labels: Tensor,
    temperature: float,
    top_k: int | None = None,
) -> Tensor:
    """``T^2`` x the mean over target tokens of KL(teacher || student) at temperature ``T``, in fp32.

    Logits are ``[batch, seq, vocab]`` and ``labels`` ``[batch, seq]``, as a causal LM takes
    them: the logits at position t predict label t + 1, and positions whose next label is
    ``IGNORE_INDEX`` are left out. ``teacher`` is its full logits or its precomputed top
    logits. ``top_k`` (None = the whole vocabulary) restricts full teacher logits to their k
    most likely tokens, renormalised; k at least the vocabulary is the full KL.
    """
    targets = labels[:, 1:] != IGNORE_INDEX
    student_log_probs = (student_logits[:, :-1][targets].float() / temperature).log_softmax(-1)
    if isinstance(teacher, Tensor) and top_k is not None and top_k < teacher.shape[-1]:
        teacher = top_logits(teacher, top_k)
    if isinstance(teacher, TopLogits):
        teacher_log_probs = (teacher.values[:, :-1][targets].float() / temperature).log_softmax(-1)
        student_log_probs = student_log_probs.gather(-1, teacher.indices[:, :-1][targets].long())
    else:
        teacher_log_probs = (teacher[:, :-1][targets].float() / temperature).log_softmax(-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    # A batch without targets contributes zero, not the NaN of an empty mean.
    return kl.sum() / targets.sum().clamp(min=1) * temperature**2
