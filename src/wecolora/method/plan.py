"""The student's plan: modes, and the kept blocks, their segments and the adapter size resolved once from
the settings against a teacher (:func:`plan_student`). Every consumer (distill, inspect, bench, ablate, export)
reads the plan instead of re-deriving a default rank or a kept list."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from wecolora.config import DEFAULT_REDUCTION, KEEP_SEARCHES, parse_keep
from wecolora.errors import UserError
from wecolora.method.block_search import choose_blocks
from wecolora.method.blocks import check_reduction, segment_ends, select_blocks
from wecolora.teachers.vit import require_supported_vit


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


def default_rank(width: int) -> int:
    """The paper's rank 128, reduced to width/4 for teachers narrower than 512."""
    return min(128, max(1, width // 4))


def check_rank(rank: int | None, width: int) -> None:
    """The one rank check: an adapter of rank r on a width-D map needs 1 <= r <= D."""
    if rank is None or not 1 <= rank <= width:
        raise UserError(f"rank {rank} does not fit the teacher's width {width}: choose 1 <= --rank <= {width} "
                        f"(default {default_rank(width)})")


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
        if get_mode(self.mode).adapter_targets is not None:
            check_rank(self.rank, self.width)

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
    """Everything :func:`plan_student` checks short of choosing blocks; a weightless ``model_shape``
    will do, so a run can refuse bad settings before reading weights. Returns the parsed keep."""
    spec = get_mode(mode)
    require_supported_vit(teacher)
    depth, width = len(teacher.blocks), teacher.embed_dim
    keep = parse_keep(keep)
    if keep in KEEP_SEARCHES:
        check_reduction(depth, reduction)
    else:
        select_blocks(depth, reduction, keep)
    if spec.adapter_targets is not None and rank is not None:
        check_rank(rank, width)
    if alpha is not None and not alpha > 0:
        raise UserError(f"lora alpha {alpha} is invalid: choose a positive --lora-alpha (default: the rank)")
    return keep


def plan_student(teacher: nn.Module, reduction: int = DEFAULT_REDUCTION, keep="first", mode: str = "wecolora",
                 rank: int | None = None, *, alpha: float | None = None, images: torch.Tensor | None = None,
                 choice=None, seed: int = 0) -> StudentPlan:
    """Resolve the student's settings against a teacher, once.

    Args:
        teacher: a timm VisionTransformer (weights needed only for a searched keep).
        reduction: keep ceil(depth / r) blocks (ignored by an explicit list).
        keep: ``first``, ``last``, a list of teacher block indices (or "0,3,7"), or a search of
            :data:`wecolora.config.KEEP_SEARCHES` (``auto``, ``greedy``, ``influence``), which needs ``images``.
        mode: one of :data:`MODES`.
        rank: adapter rank; default :func:`default_rank` for adapter modes, None otherwise.
        alpha: peft ``lora_alpha``; default the rank (scale 1).
        images: ``[N, C, H, W]`` preprocessed images of the few-shot subset, for a searched keep.
        choice: a :class:`wecolora.method.block_search.BlockChoice` made earlier (a resumed run), instead of images.
        seed: seeds the split of ``images`` into search and scoring images.

    Example:
        >>> plan = plan_student(teacher, 3, "auto", images=images)   # doctest: +SKIP
        >>> plan.kept, plan.search["candidates"]["first"]["l1"]       # doctest: +SKIP
    """

    keep = check_settings(teacher, reduction, keep, mode, rank, alpha)
    depth, width = len(teacher.blocks), teacher.embed_dim
    search = None
    if keep in KEEP_SEARCHES:
        if choice is None:
            if images is None:
                raise UserError(f"keep {keep!r} chooses the kept blocks from images: pass images= (a few hundred "
                                f"preprocessed images of the few-shot subset), or give first, last or a block list")
            choice = choose_blocks(teacher, reduction, keep, images, seed=seed)
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
