"""FLOPs of one distillation training step, counted by torch's FLOP counter rather than timed.

A count depends on the shapes only, not on the machine or on who else uses it: it is how the lean adapter
path (:func:`wecolora.method.adapters.lean_student`) is compared with a full fine-tune of the same student. Only
matmuls, convolutions and attention are counted (what ``torch.utils.flop_counter`` knows); they are nearly
all of a ViT's cost.
"""
from __future__ import annotations

import torch
from torch import nn

from wecolora.config import DEFAULT_REDUCTION
from wecolora.method.adapters import lean_student
from wecolora.method.losses import feature_loss
from wecolora.method.student import build_student
from wecolora.teachers.vit import last_block_tokens


def count(fn) -> int:
    """FLOPs ``fn`` runs (a multiply-add counts 2), counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops(model: nn.Module, batch: int = 1) -> float:
    """FLOPs of one inference forward per image, counted on random input at the model's input size (free on the
    ``meta`` device)."""
    param = next(model.parameters())
    images = torch.zeros(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size, device=param.device,
                         dtype=param.dtype)
    with torch.inference_mode():
        return count(lambda: model(images)) / batch


def step_flops(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> int:
    """FLOPs of one training step of ``model``: its last-block tokens, their L1 loss against ``targets`` and
    the gradients of its trainable parameters (those ``backward`` would compute; no ``.grad`` is written).

    Args:
        model: a timm ViT, or a student's training view from :func:`wecolora.method.adapters.lean_student`.
        images: ``[B, 3, H, W]``, normalised; the ``meta`` device counts without computing.
        targets: ``[B, N, D]``, the tokens the last block should output.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step():
        tokens = last_block_tokens(model, images)
        loss = feature_loss(tokens, [targets], "l1")["loss"]
        torch.autograd.grad(loss, trainable, allow_unused=True)  # the final norm and head are not reached

    return count(step)


def student_step_flops(teacher: nn.Module, images: torch.Tensor, *, mode: str, reduction: int = DEFAULT_REDUCTION,
                       rank: int | None = None) -> int:
    """FLOPs of one training step of the ``mode`` student of ``teacher`` as distill trains it (through the lean
    adapter view where it applies), on the teacher's last-block tokens of ``images``."""
    with torch.no_grad():
        targets = last_block_tokens(teacher, images)[0]
    student = lean_student(build_student(teacher, reduction, mode=mode, rank=rank))
    return step_flops(student, images, targets)


def step_flops_ratio(teacher: nn.Module, images: torch.Tensor, *, reduction: int = DEFAULT_REDUCTION, rank: int | None = None) -> float:
    """Counted FLOPs of a wecolora training step (lean adapter path) over a full fine-tune's (``weco-kd``: every
    copied weight trains) of the same student.

    The adapters' ``ΔW = B·A`` is built once a step whatever the batch, so count at the training batch size:
    on the ``meta`` device (teacher and images) that is free.

    Example:
        >>> teacher = wecolora.teachers.load.load_model("bundled").to("meta")                  # doctest: +SKIP
        >>> step_flops_ratio(teacher, torch.empty(128, 3, 28, 28, device="meta"))   # doctest: +SKIP
        0.905...
    """
    lean, full = (student_step_flops(teacher, images, mode=mode, reduction=reduction, rank=rank)
                  for mode in ("wecolora", "weco-kd"))
    return lean / full
