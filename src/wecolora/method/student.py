"""Weight-copy students: keep every r-th block of a timm ViT teacher (optionally fewer channels, heads and
MLP neurons), freeze it, add adapters.

The student is a real ``timm.create_model(architecture, depth=k)`` model (narrower:
``embed_dim=D', num_heads=H', mlp_ratio=M'/D'``) whose state dict is the teacher's with ``blocks.{kept[i]}``
renamed to ``blocks.{i}`` (and sliced to the kept indices, :mod:`wecolora.method.width`); it reloads anywhere
timm does.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

from wecolora.config import DEFAULT_REDUCTION
from wecolora.errors import UserError
from wecolora.method.adapters import add_adapters, merge
from wecolora.method.plan import StudentPlan, get_mode, plan_student
from wecolora.method.width import StudentWidth, TeacherWidth, slice_state_dict
from wecolora.teachers.vit import architecture, mlp_ratio, model_args, require_supported_vit

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
        reduction: int = DEFAULT_REDUCTION,
        keep: str | list[int] = "first",
        mode: str = "wecolora",
        rank: int | None = None,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
        images: torch.Tensor | None = None,
        seed: int = 0,
        **width,
) -> nn.Module:
    """Build the student of ``teacher`` for a mode: :func:`plan_student`, then :func:`student_from_plan`.

    Args:
        teacher: a timm VisionTransformer (its weights are copied, it is not modified).
        reduction: keep every r-th block (12 blocks, r=2 -> 6).
        keep: ``first``, ``last``, an explicit list of teacher block indices, or ``auto``/``greedy``/
            ``influence`` with ``images`` (see :mod:`wecolora.method.block_search`).
        mode: one of :data:`MODES`.
        rank: adapter rank for adapter modes; default :func:`default_rank`.
        width: ``embed_dim``, ``heads``, ``mlp_hidden`` or ``width_ratio``, and ``width_ranking``
            (``activation`` needs ``images``; ``uniform`` none): a narrower student, see :func:`plan_student`.

    Returns:
        A module whose ``forward`` and ``forward_intermediates`` behave like a timm
        VisionTransformer: a peft model for adapter modes, a plain timm model otherwise.

    Example:
        >>> teacher = timm.create_model("vit_base_patch16_224.mae", pretrained=True)  # doctest: +SKIP
        >>> student = wecolora.build_student(teacher, reduction=2, rank=128)          # doctest: +SKIP
        >>> narrow = wecolora.build_student(teacher, 2, embed_dim=384, width_ranking="uniform")  # doctest: +SKIP
    """
    plan = plan_student(teacher, reduction, keep, mode, rank, alpha=alpha, images=images, seed=seed, **width)
    return student_from_plan(teacher, plan, dropout=dropout, use_dora=use_dora, use_rslora=use_rslora)


def student_from_plan(teacher: nn.Module, plan: StudentPlan, *, dropout: float = 0.0, use_dora: bool = False,
                      use_rslora: bool = False) -> nn.Module:
    """The student a plan describes: the teacher's kept blocks renumbered (or random init), plus adapters."""
    import timm

    require_supported_vit(teacher)
    if len(teacher.blocks) != plan.teacher_blocks or teacher.embed_dim != plan.width:
        raise UserError(f"the plan is for a {plan.teacher_blocks}-block, width-{plan.width} teacher, not this "
                        f"{len(teacher.blocks)}-block, width-{teacher.embed_dim} one: plan it for this teacher")
    kept = list(plan.kept)
    student = timm.create_model(architecture(teacher), pretrained=False,
                                **student_args(teacher, len(kept), plan.student_width))
    student.pretrained_cfg = copy.deepcopy(teacher.pretrained_cfg)  # mean/std/input size of the teacher
    student.to(next(teacher.parameters()).device)
    if get_mode(plan.mode).copy_weights:
        state = remap_block_keys(teacher.state_dict(), kept)
        if plan.narrow:
            state = slice_state_dict(state, plan.width_choice, TeacherWidth.of(teacher))
        student.load_state_dict(state, strict=True)
    if plan.adapter_targets is None:
        return student
    return add_adapters(
        student, plan.adapter_targets, rank=plan.rank, alpha=plan.alpha, dropout=dropout,
        use_dora=use_dora, use_rslora=use_rslora,
    )


def student_args(teacher: nn.Module, depth: int, width: StudentWidth | None = None) -> dict:
    """``timm.create_model`` arguments of a student of ``teacher``: ``depth`` blocks, at ``width`` (default the
    teacher's). The merged student of any mode has this architecture.

    >>> student_args(teacher, 6, StudentWidth(64, 2, 256))["mlp_ratio"]   # doctest: +SKIP
    4.0
    """
    args = dict(model_args(teacher), depth=depth)
    if width is not None:
        args.update(embed_dim=width.embed_dim, num_heads=width.heads, mlp_ratio=mlp_ratio(width.embed_dim, width.mlp_hidden))
    return args


def merged_architecture(teacher: nn.Module, depth: int, width: StudentWidth | None = None, *,
                        device: str | torch.device = "meta") -> nn.Module:
    """The merged student's architecture (a plain timm ViT of ``depth`` blocks at ``width``) with timm's random
    init, in eval mode: what the planner times and inspect counts (on ``meta`` nothing is allocated)."""
    import timm

    with torch.device(device):
        model = timm.create_model(architecture(teacher), pretrained=False, **student_args(teacher, depth, width))
    model.pretrained_cfg = copy.deepcopy(teacher.pretrained_cfg)
    return model.eval()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(teacher: nn.Module, reduction: int = DEFAULT_REDUCTION, keep: str | list[int] = "first", mode: str = "wecolora",
             rank: int | None = None, **width) -> dict:
    """Kept blocks, widths and parameter counts of a student, without training (``wecolora inspect``).

    ``width``: ``embed_dim``, ``heads``, ``mlp_hidden`` or ``width_ratio`` (the kept indices do not change the
    counts, so they are chosen by the data-free ``uniform`` ranking here).
    """
    plan = plan_student(teacher, reduction, keep, mode, rank, width_ranking="uniform", **width)
    student = student_from_plan(teacher, plan)
    merged = merge(student)
    full = TeacherWidth.of(teacher)
    shape = plan.student_width or StudentWidth(full.embed_dim, full.heads, full.mlp_hidden)
    return {
        "teacher": architecture(teacher),
        "mode": mode,
        "reduction": reduction,
        "keep": keep,
        "teacher_blocks": plan.teacher_blocks,
        "kept_blocks": list(plan.kept),
        "segment_ends": list(plan.segment_ends),
        "rank": plan.rank,
        "width": plan.width,
        "teacher_heads": full.heads,
        "teacher_mlp_hidden": full.mlp_hidden,
        "embed_dim": shape.embed_dim,
        "heads": shape.heads,
        "head_dim": full.head_dim,
        "mlp_hidden": shape.mlp_hidden,
        "teacher_params": count_parameters(teacher),
        "student_params": count_parameters(student),
        "trainable_params": count_parameters(student, trainable_only=True),
        "merged_params": count_parameters(merged),
    }
