"""Weight-copy students: keep every r-th block of a timm ViT teacher, freeze it, add adapters.

The student is a real ``timm.create_model(architecture, depth=k)`` model whose state dict is the
teacher's with ``blocks.{kept[i]}`` renamed to ``blocks.{i}``; it reloads anywhere timm does.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from . import adapters, vit
from .config import parse_keep
from .errors import UserError

KEEP_RULES = ("first", "last")  # fixed positions; the searched keeps are block_search.METHODS


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
    """0-indexed teacher blocks the student keeps, for a rule or an explicit list.

    ``first`` keeps the first block of each group of ``reduction`` (the reference code),
    ``last`` the last of each full group (the paper's figure); a list is taken as given.
    The searched keeps (``auto``, ``greedy``, ``influence``) need images: see :func:`plan_student`.

    >>> select_blocks(12, 3, "first"), select_blocks(12, 3, "last")
    ([0, 3, 6, 9], [2, 5, 8, 11])
    """
    keep = parse_keep(keep)
    if not isinstance(keep, str):
        kept = sorted(set(keep))
        if kept[0] < 0 or kept[-1] >= depth:
            raise UserError(f"kept blocks {list(keep)} must be a non-empty list within 0..{depth - 1} (the teacher "
                            f"has {depth} blocks)")
        return kept
    check_reduction(depth, reduction)
    if keep == "first":
        return list(range(0, depth, reduction))
    if keep == "last":
        return list(range(reduction - 1, depth, reduction))
    raise UserError(f"keep {keep!r} chooses blocks from images: build its plan with plan_student(..., images=...) "
                    f"or give one of {', '.join(KEEP_RULES)} or a list of block indices")


def check_reduction(depth: int, reduction: int) -> int:
    """Number of blocks a reduction keeps, ceil(depth / r), after checking that r fits the teacher."""
    if not isinstance(reduction, int) or not 1 <= reduction < depth:
        raise UserError(f"reduction {reduction} is impossible for a {depth}-block teacher: choose 1 <= r < {depth}")
    return -(-depth // reduction)


def segment_ends(kept: list[int], depth: int, *, ends_at_kept: bool = False) -> list[int]:
    """Teacher block whose output student block i stands for: the end of the teacher segment it replaces.

    The kept blocks split the teacher into contiguous segments, one per kept block. By default a kept block
    starts its segment and answers for the dropped blocks after it, up to the teacher block just before the
    next kept one: the output the next copied block received in the teacher. With ``ends_at_kept`` (the
    ``last`` rule, the paper's groups) each kept block ends its own segment. Either way the last student
    block answers for the teacher's last block. The result depends on the list only, so an explicit
    ``--keep`` list reproduces a searched choice exactly.

    >>> segment_ends([0, 3, 6, 9], 12), segment_ends([2, 5, 8, 11], 12, ends_at_kept=True)
    ([2, 5, 8, 11], [2, 5, 8, 11])
    >>> segment_ends([0, 1, 4, 9], 12)
    [0, 3, 8, 11]
    """
    ends = list(kept) if ends_at_kept else [nxt - 1 for nxt in kept[1:]] + [depth - 1]
    ends[-1] = depth - 1
    return ends


def default_rank(width: int) -> int:
    """The paper's rank 128, reduced to width/4 for teachers narrower than 512."""
    return min(128, max(1, width // 4))


@dataclass(frozen=True)
class StudentPlan:
    """What the student is, resolved once from the settings: kept blocks, their segments, mode, adapter size.

    Every consumer (distill, inspect, bench, ablate, export) reads this instead of re-deriving a default
    rank or a kept list. Build it with :func:`plan_student`.
    """
    teacher_blocks: int
    width: int
    reduction: int
    kept: tuple[int, ...]
    mode: str
    rank: int | None  # None: a mode without adapters
    alpha: float | None  # peft lora_alpha; rank by default (scale 1, as in the paper)
    keep: str  # how the blocks were chosen: first, last, list, auto, greedy or influence
    search: dict | None = field(default=None, compare=False)  # block_search's record (candidates and scores)

    def __post_init__(self):
        kept = list(self.kept)
        if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= self.teacher_blocks:
            raise UserError(f"kept blocks {kept} must be increasing teacher block indices within "
                            f"0..{self.teacher_blocks - 1}")
        spec = get_mode(self.mode)
        if spec.adapter_targets is not None and not (self.rank is not None and 1 <= self.rank <= self.width):
            raise UserError(f"rank {self.rank} does not fit the teacher's width {self.width}: choose "
                            f"1 <= --rank <= {self.width} (default {default_rank(self.width)})")

    @property
    def segment_ends(self) -> tuple[int, ...]:
        return tuple(segment_ends(list(self.kept), self.teacher_blocks, ends_at_kept=self.keep == "last"))

    @property
    def adapter_targets(self) -> tuple[str, ...] | None:
        return get_mode(self.mode).adapter_targets

    def record(self) -> dict:
        """The plan as plain values, for ``config.yaml`` (resolved) and ``adapter/wecolora.json``."""
        return {"teacher_blocks": self.teacher_blocks, "reduction": self.reduction, "keep_method": self.keep,
                "kept_blocks": list(self.kept), "segment_ends": list(self.segment_ends), "mode": self.mode,
                "rank": self.rank, "lora_alpha": self.alpha, "block_search": self.search}


def check_settings(teacher: nn.Module, reduction: int, keep, mode: str, rank: int | None = None,
                   alpha: float | None = None) -> str | list[int]:
    """Everything :func:`plan_student` checks short of choosing blocks; a weightless ``vit.model_shape``
    will do, so a run can refuse bad settings before reading weights. Returns the parsed keep."""
    from .block_search import METHODS

    spec = get_mode(mode)
    vit.require_supported_vit(teacher)
    depth, width = len(teacher.blocks), teacher.embed_dim
    keep = parse_keep(keep)
    if keep in METHODS:
        check_reduction(depth, reduction)
    else:
        select_blocks(depth, reduction, keep)
    if spec.adapter_targets is not None and rank is not None and not 1 <= rank <= width:
        raise UserError(f"rank {rank} does not fit the teacher's width {width}: choose 1 <= --rank <= {width} "
                        f"(default {default_rank(width)})")
    if alpha is not None and not alpha > 0:
        raise UserError(f"lora alpha {alpha} is invalid: choose a positive --lora-alpha (default: the rank)")
    return keep


def plan_student(teacher: nn.Module, reduction: int = 2, keep="first", mode: str = "wecolora",
                 rank: int | None = None, *, alpha: float | None = None, images: torch.Tensor | None = None,
                 choice=None, seed: int = 0) -> StudentPlan:
    """Resolve the student's settings against a teacher, once.

    Args:
        teacher: a timm VisionTransformer (weights needed only for a searched keep).
        reduction: keep ceil(depth / r) blocks (ignored by an explicit list).
        keep: ``first``, ``last``, a list of teacher block indices (or "0,3,7"), or a search of
            :data:`wecolora.block_search.METHODS` (``auto``, ``greedy``, ``influence``), which needs ``images``.
        mode: one of :data:`MODES`.
        rank: adapter rank; default :func:`default_rank` for adapter modes, None otherwise.
        alpha: peft ``lora_alpha``; default the rank (scale 1).
        images: ``[N, C, H, W]`` preprocessed images of the few-shot subset, for a searched keep.
        choice: a :class:`wecolora.block_search.BlockChoice` made earlier (a resumed run), instead of images.
        seed: seeds the split of ``images`` into search and scoring images.

    Example:
        >>> plan = plan_student(teacher, 3, "auto", images=images)   # doctest: +SKIP
        >>> plan.kept, plan.search["candidates"]["first"]["l1"]       # doctest: +SKIP
    """
    from . import block_search

    keep = check_settings(teacher, reduction, keep, mode, rank, alpha)
    depth, width = len(teacher.blocks), teacher.embed_dim
    search = None
    if keep in block_search.METHODS:
        if choice is None:
            if images is None:
                raise UserError(f"keep {keep!r} chooses the kept blocks from images: pass images= (a few hundred "
                                f"preprocessed images of the few-shot subset), or give first, last or a block list")
            choice = block_search.choose_blocks(teacher, reduction, keep, images, seed=seed)
        if choice.method != keep or len(choice.kept) != check_reduction(depth, reduction):
            raise UserError(f"the recorded block choice ({choice.method}, {list(choice.kept)}) does not match "
                            f"keep {keep!r} at reduction {reduction}: rerun without --resume or with --overwrite")
        kept, search, how = list(choice.kept), choice.record(), keep
    else:
        kept, how = select_blocks(depth, reduction, keep), keep if isinstance(keep, str) else "list"
    if get_mode(mode).adapter_targets is None:
        rank = alpha = None
    else:
        rank = default_rank(width) if rank is None else rank
        alpha = float(rank) if alpha is None else float(alpha)
    return StudentPlan(teacher_blocks=depth, width=width, reduction=reduction, kept=tuple(kept), mode=mode,
                       rank=rank, alpha=alpha, keep=how, search=search)


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
        images: torch.Tensor | None = None,
        seed: int = 0,
) -> nn.Module:
    """Build the student of ``teacher`` for a mode: :func:`plan_student`, then :func:`student_from_plan`.

    Args:
        teacher: a timm VisionTransformer (its weights are copied, it is not modified).
        reduction: keep every r-th block (12 blocks, r=2 -> 6).
        keep: ``first``, ``last``, an explicit list of teacher block indices, or ``auto``/``greedy``/
            ``influence`` with ``images`` (see :mod:`wecolora.block_search`).
        mode: one of :data:`MODES`.
        rank: adapter rank for adapter modes; default :func:`default_rank`.

    Returns:
        A module whose ``forward`` and ``forward_intermediates`` behave like a timm
        VisionTransformer: a peft model for adapter modes, a plain timm model otherwise.

    Example:
        >>> teacher = timm.create_model("vit_base_patch16_224.mae", pretrained=True)  # doctest: +SKIP
        >>> student = wecolora.build_student(teacher, reduction=2, rank=128)          # doctest: +SKIP
    """
    plan = plan_student(teacher, reduction, keep, mode, rank, alpha=alpha, images=images, seed=seed)
    return student_from_plan(teacher, plan, dropout=dropout, use_dora=use_dora, use_rslora=use_rslora)


def student_from_plan(teacher: nn.Module, plan: StudentPlan, *, dropout: float = 0.0, use_dora: bool = False,
                      use_rslora: bool = False) -> nn.Module:
    """The student a plan describes: the teacher's kept blocks renumbered (or random init), plus adapters."""
    import timm

    vit.require_supported_vit(teacher)
    if len(teacher.blocks) != plan.teacher_blocks or teacher.embed_dim != plan.width:
        raise UserError(f"the plan is for a {plan.teacher_blocks}-block, width-{plan.width} teacher, not this "
                        f"{len(teacher.blocks)}-block, width-{teacher.embed_dim} one: plan it for this teacher")
    kept = list(plan.kept)
    args = dict(vit.model_args(teacher), depth=len(kept))
    student = timm.create_model(vit.architecture(teacher), pretrained=False, **args)
    student.pretrained_cfg = copy.deepcopy(teacher.pretrained_cfg)  # mean/std/input size of the teacher
    student.to(next(teacher.parameters()).device)
    if get_mode(plan.mode).copy_weights:
        student.load_state_dict(remap_block_keys(teacher.state_dict(), kept), strict=True)
    if plan.adapter_targets is None:
        return student
    return adapters.add_adapters(
        student, plan.adapter_targets, rank=plan.rank, alpha=plan.alpha, dropout=dropout,
        use_dora=use_dora, use_rslora=use_rslora,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(teacher: nn.Module, reduction: int = 2, keep: str | list[int] = "first", mode: str = "wecolora",
             rank: int | None = None) -> dict:
    """Kept blocks and parameter counts of a student, without training (``wecolora inspect``)."""
    plan = plan_student(teacher, reduction, keep, mode, rank)
    student = student_from_plan(teacher, plan)
    merged = adapters.merge(student)
    return {
        "teacher": vit.architecture(teacher),
        "mode": mode,
        "reduction": reduction,
        "keep": keep,
        "teacher_blocks": plan.teacher_blocks,
        "kept_blocks": list(plan.kept),
        "segment_ends": list(plan.segment_ends),
        "rank": plan.rank,
        "width": plan.width,
        "teacher_params": count_parameters(teacher),
        "student_params": count_parameters(student),
        "trainable_params": count_parameters(student, trainable_only=True),
        "merged_params": count_parameters(merged),
    }
