"""The student's plan: modes, and the kept blocks, their segments, the width (channels, heads, MLP neurons)
and the adapter size resolved once from the settings against a teacher (:func:`plan_student`). Every consumer
(distill, inspect, bench, ablate, export) reads the plan instead of re-deriving a default rank or a kept list."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from wecolora.config import DEFAULT_REDUCTION, KEEP_SEARCHES, parse_keep
from wecolora.errors import UserError
from wecolora.method.block_search import choose_blocks
from wecolora.method.blocks import check_reduction, segment_ends, select_blocks
from wecolora.method.width import StudentWidth, TeacherWidth, WidthChoice, choose_width, resolve_width
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


def check_rank(rank: int | None, width: int, whose: str = "the teacher's") -> None:
    """The one rank check: an adapter of rank r on a width-D map needs 1 <= r <= D (D: the student's width)."""
    if rank is None or not 1 <= rank <= width:
        raise UserError(f"rank {rank} does not fit {whose} width {width}: choose 1 <= --rank <= {width} "
                        f"(default {default_rank(width)})")


@dataclass(frozen=True)
class StudentPlan:
    """What the student is, resolved once from the settings: kept blocks, their segments, width, mode, adapter size.

    Every consumer (distill, inspect, bench, ablate, export) reads this instead of re-deriving a default
    rank or a kept list. Build it with :func:`plan_student`.
    """
    teacher_blocks: int
    width: int  # the teacher's residual width
    reduction: int
    kept: tuple[int, ...]
    mode: str
    rank: int | None  # None: a mode without adapters
    alpha: float | None  # peft lora_alpha; rank by default (scale 1, as in the paper)
    keep: str  # how the blocks were chosen: first, last, list, auto, greedy or influence
    search: dict | None = field(default=None, compare=False)  # block_search's record (candidates and scores)
    student_width: StudentWidth | None = None  # None: the teacher's widths
    width_choice: WidthChoice | None = None  # the kept channels, heads and neurons of a narrower student

    def __post_init__(self):
        kept = list(self.kept)
        if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= self.teacher_blocks:
            raise UserError(f"kept blocks {kept} must be increasing teacher block indices within "
                            f"0..{self.teacher_blocks - 1}")
        if (self.width_choice is None) != (self.student_width is None):
            raise ValueError("a narrower student's plan needs both its widths and the indices it keeps")
        if self.width_choice is not None and not self.width_choice.fits(self.student_width, len(kept)):
            raise UserError(f"the recorded width choice does not fit {self.student_width} with {len(kept)} blocks: "
                            f"rerun without --resume or with --overwrite")
        if get_mode(self.mode).adapter_targets is not None:
            check_rank(self.rank, self.embed_dim, "the teacher's" if self.student_width is None else "the student's")

    @property
    def narrow(self) -> bool:
        """Whether the student is narrower than the teacher on some axis (channels, heads or neurons)."""
        return self.width_choice is not None

    @property
    def embed_dim(self) -> int:
        return self.width if self.student_width is None else self.student_width.embed_dim

    @property
    def segment_ends(self) -> tuple[int, ...]:
        return tuple(segment_ends(list(self.kept), self.teacher_blocks, ends_at_kept=self.keep == "last"))

    @property
    def adapter_targets(self) -> tuple[str, ...] | None:
        return get_mode(self.mode).adapter_targets

    def record(self) -> dict:
        """The plan as plain values, for ``config.yaml`` (resolved) and ``adapter/wecolora.json``."""
        shape = {} if self.student_width is None else {
            "embed_dim": self.student_width.embed_dim, "heads": self.student_width.heads,
            "mlp_hidden": self.student_width.mlp_hidden}
        return {"teacher_blocks": self.teacher_blocks, "reduction": self.reduction, "keep_method": self.keep,
                "kept_blocks": list(self.kept), "segment_ends": list(self.segment_ends), "mode": self.mode,
                "rank": self.rank, "lora_alpha": self.alpha, "block_search": self.search, **shape,
                "width_selection": None if self.width_choice is None else self.width_choice.record()}


def check_settings(teacher: nn.Module, reduction: int, keep, mode: str, rank: int | None = None,
                   alpha: float | None = None, *, widths: dict | None = None) -> str | list[int]:
    """Everything :func:`plan_student` checks short of choosing blocks and channels; a weightless ``model_shape``
    will do, so a run can refuse bad settings before reading weights. Returns the parsed keep.

    ``widths``: the width settings (``embed_dim``, ``heads``, ``mlp_hidden``, ``width_ratio``), if any.
    """
    spec = get_mode(mode)
    require_supported_vit(teacher)
    depth = len(teacher.blocks)
    keep = parse_keep(keep)
    if keep in KEEP_SEARCHES:
        check_reduction(depth, reduction)
    else:
        select_blocks(depth, reduction, keep)
    student = student_width(teacher, widths)
    if spec.adapter_targets is not None and rank is not None:
        if student is None:
            check_rank(rank, teacher.embed_dim)
        else:
            check_rank(rank, student.embed_dim, "the student's")
    if alpha is not None and not alpha > 0:
        raise UserError(f"lora alpha {alpha} is invalid: choose a positive --lora-alpha (default: the rank)")
    return keep


def student_width(teacher: nn.Module, widths: dict | None) -> StudentWidth | None:
    """The student's widths from the width settings, or None where it keeps the teacher's on every axis."""
    if not widths or all(v is None for v in widths.values()):
        return None
    if getattr(teacher, "attn_pool", None) is not None:
        raise UserError("narrower students of a teacher with attention pooling (global_pool='map') are not "
                        "supported: give no --embed-dim/--heads/--mlp-hidden/--width-ratio")
    full = TeacherWidth.of(teacher)
    width = resolve_width(full, **widths)
    return width if width.narrower_than(full) else None


def plan_student(teacher: nn.Module, reduction: int = DEFAULT_REDUCTION, keep="first", mode: str = "wecolora",
                 rank: int | None = None, *, alpha: float | None = None, images: torch.Tensor | None = None,
                 choice=None, seed: int = 0, embed_dim: int | None = None, heads: int | None = None,
                 mlp_hidden: int | None = None, width_ratio: float | None = None, width_ranking: str = "activation",
                 width_choice: WidthChoice | None = None) -> StudentPlan:
    """Resolve the student's settings against a teacher, once.

    Args:
        teacher: a timm VisionTransformer (weights needed only for a searched keep).
        reduction: keep ceil(depth / r) blocks (ignored by an explicit list).
        keep: ``first``, ``last``, a list of teacher block indices (or "0,3,7"), or a search of
            :data:`wecolora.config.KEEP_SEARCHES` (``auto``, ``greedy``, ``influence``), which needs ``images``.
        mode: one of :data:`MODES`.
        rank: adapter rank; default :func:`default_rank` for adapter modes, None otherwise.
        alpha: peft ``lora_alpha``; default the rank (scale 1).
        images: ``[N, C, H, W]`` preprocessed images of the few-shot subset, for a searched keep and the
            ``activation`` width ranking.
        choice: a :class:`wecolora.method.block_search.BlockChoice` made earlier (a resumed run), instead of images.
        seed: seeds the split of ``images`` into search and scoring images.
        embed_dim, heads, mlp_hidden, width_ratio: a narrower student (:func:`wecolora.method.width.resolve_width`);
            default the teacher's widths.
        width_ranking: ``activation`` (needs ``images``) or ``uniform``: which channels, heads and neurons.
        width_choice: a :class:`wecolora.method.width.WidthChoice` made earlier (a resumed run).

    Example:
        >>> plan = plan_student(teacher, 3, "auto", images=images)   # doctest: +SKIP
        >>> plan.kept, plan.search["candidates"]["first"]["l1"]       # doctest: +SKIP
        >>> plan_student(teacher, 2, embed_dim=64, width_ranking="uniform").record()["width_selection"]  # doctest: +SKIP
    """
    widths = {"embed_dim": embed_dim, "heads": heads, "mlp_hidden": mlp_hidden, "width_ratio": width_ratio}
    keep = check_settings(teacher, reduction, keep, mode, rank, alpha, widths=widths)
    depth = len(teacher.blocks)
    narrow = student_width(teacher, widths)
    width = teacher.embed_dim if narrow is None else narrow.embed_dim  # what the adapters wrap
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
    if narrow is not None and width_choice is None:
        width_choice = choose_width(teacher, kept, narrow, width_ranking, images)
    return StudentPlan(teacher_blocks=depth, width=teacher.embed_dim, reduction=reduction, kept=tuple(kept), mode=mode,
                       rank=rank, alpha=alpha, keep=how, search=search, student_width=narrow,
                       width_choice=width_choice if narrow is not None else None)
