"""Weight-copy students: keep every r-th block of a timm ViT teacher, freeze it, add adapters.

The student is a real ``timm.create_model(architecture, depth=k)`` model whose state dict is the
teacher's with ``blocks.{kept[i]}`` renamed to ``blocks.{i}``; it reloads anywhere timm does.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from . import adapters, vit
from .errors import UserError

KEEP_CHOICES = ("first", "last")


@dataclass(frozen=True)
class Mode:
    """How a student is initialised and trained."""
    copy_weights: bool  # start from the teacher's kept blocks (else random init)
    adapter_targets: tuple[str, ...] | None  # None: no adapters, every parameter trains
    description: str


MODES = {
    "wecolora": Mode(True, ("q", "k", "v", "proj", "fc1", "fc2"), "frozen copy + LoRA on q, k, v, proj, fc1, fc2"),
    "lora-qv": Mode(True, ("q", "v"), "frozen copy + plain LoRA on q and v"),
    "weco-kd": Mode(True, None, "weight copy, all parameters trained"),
    "scratch-kd": Mode(False, None, "random init of the same shape, all parameters trained"),
}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise UserError(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
    return MODES[name]


def select_blocks(depth: int, reduction: int, keep: str | list[int] = "first") -> list[int]:
    """0-indexed teacher blocks the student keeps.

    ``first`` keeps the first block of each group of ``reduction`` (the reference code),
    ``last`` the last of each full group (the paper's figure); a list is taken as given.

    >>> select_blocks(12, 3, "first"), select_blocks(12, 3, "last")
    ([0, 3, 6, 9], [2, 5, 8, 11])
    """
    if not isinstance(keep, str):
        kept = sorted(set(int(b) for b in keep))
        if not kept or kept[0] < 0 or kept[-1] >= depth:
            raise UserError(f"kept blocks {list(keep)} must be a non-empty list within 0..{depth - 1}")
        return kept
    if not 1 <= reduction < depth:
        raise UserError(f"reduction {reduction} is impossible for a {depth}-block teacher: choose 1 <= r < {depth}")
    if keep == "first":
        return list(range(0, depth, reduction))
    if keep == "last":
        return list(range(reduction - 1, depth, reduction))
    raise UserError(f"keep must be one of {KEEP_CHOICES} or a list of block indices, got {keep!r}")


def group_ends(kept: list[int], depth: int, keep: str | list[int] = "first") -> list[int]:
    """Teacher block whose output student block i should reproduce (the end of its group).

    With ``last`` a kept block ends its own group; otherwise a kept block stands for itself and
    the dropped blocks after it. The last student block always answers for the teacher's last block.

    >>> group_ends([0, 3, 6, 9], 12), group_ends([2, 5, 8, 11], 12, "last")
    ([2, 5, 8, 11], [2, 5, 8, 11])
    """
    ends = list(kept) if keep == "last" else [nxt - 1 for nxt in kept[1:]] + [depth - 1]
    ends[-1] = depth - 1
    return ends


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def remap_block_keys(state_dict: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """Teacher state dict -> student state dict: drop unkept blocks, renumber kept ones.

    >>> sorted(remap_block_keys({"blocks.0.w": 0, "blocks.1.w": 1, "blocks.2.w": 2, "norm.w": 3}, [0, 2]))
    ['blocks.0.w', 'blocks.1.w', 'norm.w']
    """
    new_index = {old: new for new, old in enumerate(kept)}
    remapped = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            remapped[key] = value
        elif int(match.group(1)) in new_index:
            remapped[f"blocks.{new_index[int(match.group(1))]}.{match.group(2)}"] = value
    return remapped


def build_student(
        teacher: nn.Module,
        reduction: int = 2,
        keep: str | list[int] = "first",
        mode: str = "wecolora",
        rank: int | None = None,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
) -> nn.Module:
    """Build the student of ``teacher`` for a mode.

    Args:
        teacher: a timm VisionTransformer (its weights are copied, it is not modified).
        reduction: keep every r-th block (12 blocks, r=2 -> 6).
        keep: ``first``, ``last`` or an explicit list of teacher block indices.
        mode: one of :data:`MODES`.
        rank: adapter rank for adapter modes; default :func:`default_rank`.

    Returns:
        A module whose ``forward`` and ``forward_intermediates`` behave like a timm
        VisionTransformer: a peft model for adapter modes, a plain timm model otherwise.

    Example:
        >>> teacher = timm.create_model("vit_base_patch16_224.mae", pretrained=True)  # doctest: +SKIP
        >>> student = wecolora.build_student(teacher, reduction=2, rank=128)          # doctest: +SKIP
    """
    import timm

    spec = get_mode(mode)
    vit.require_supported_vit(teacher)
    kept = check_settings(teacher, reduction, keep, mode, rank)
    args = dict(vit.model_args(teacher), depth=len(kept))
    student = timm.create_model(vit.architecture(teacher), pretrained=False, **args)
    student.pretrained_cfg = copy.deepcopy(teacher.pretrained_cfg)  # mean/std/input size of the teacher
    student.to(next(teacher.parameters()).device)
    if spec.copy_weights:
        student.load_state_dict(remap_block_keys(teacher.state_dict(), kept), strict=True)
    student.wecolora_kept_blocks = kept
    if spec.adapter_targets is None:
        return student
    rank = default_rank(teacher.embed_dim) if rank is None else rank
    return adapters.add_adapters(
        student, spec.adapter_targets, rank=rank, alpha=alpha, dropout=dropout,
        use_dora=use_dora, use_rslora=use_rslora,
    )


def check_settings(teacher: nn.Module, reduction: int, keep: str | list[int], mode: str, rank: int | None) -> list[int]:
    """Validate student settings against a teacher (a weightless ``vit.model_shape`` will do); returns kept blocks."""
    spec = get_mode(mode)
    kept = select_blocks(len(teacher.blocks), reduction, keep)
    width = teacher.embed_dim
    if spec.adapter_targets is not None and rank is not None and not 1 <= rank <= width:
        raise UserError(f"rank {rank} does not fit the teacher's width {width}: choose 1 <= --rank <= {width} "
                        f"(default {default_rank(width)})")
    return kept


def default_rank(width: int) -> int:
    """The paper's rank 128, reduced to width/4 for teachers narrower than 512."""
    return min(128, max(1, width // 4))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(teacher: nn.Module, reduction: int = 2, keep: str | list[int] = "first", mode: str = "wecolora",
             rank: int | None = None) -> dict:
    """Kept blocks and parameter counts of a student, without training (``wecolora inspect``)."""
    student = build_student(teacher, reduction, keep, mode, rank)
    merged = adapters.merge(student)
    depth = len(teacher.blocks)
    return {
        "teacher": vit.architecture(teacher),
        "mode": mode,
        "reduction": reduction,
        "keep": keep,
        "teacher_blocks": depth,
        "kept_blocks": select_blocks(depth, reduction, keep),
        "rank": (default_rank(teacher.embed_dim) if rank is None else rank) if get_mode(mode).adapter_targets else None,
        "width": teacher.embed_dim,
        "teacher_params": count_parameters(teacher),
        "student_params": count_parameters(student),
        "trainable_params": count_parameters(student, trainable_only=True),
        "merged_params": count_parameters(merged),
    }
