"""One training set-up, shared by ``distill`` and ``bench``: the student seen through the loss, its optimizer
and schedule, built from a :class:`~wecolora.method.plan.StudentPlan`.

``bench`` measures exactly what ``distill`` trains because both call :func:`make_training`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wecolora.method.adapters import lean_student
from wecolora.method.losses import WidthProjector, matched_blocks
from wecolora.method.plan import StudentPlan
from wecolora.method.student import student_from_plan
from wecolora.runtime import make_scheduler
from wecolora.teachers.vit import last_block_tokens, use_fused_attention


class TokenMatcher(nn.Module):
    """The student seen through the loss: ``forward(images)`` returns the tokens to match.

    Training calls this module's plain forward, so DDP wrapping (multi-GPU) sees every step, the width
    projector of a narrower student included.
    """

    def __init__(self, student: nn.Module, blocks: list[int], norm: bool, projector: WidthProjector | None = None):
        super().__init__()
        self.student, self.blocks, self.norm, self.projector = student, blocks, norm, projector

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        tokens = last_block_tokens(self.student, images, self.blocks, norm=self.norm)
        return tokens if self.projector is None else self.projector(tokens)


def freeze_unreached(student: nn.Module, norm: bool) -> None:
    """Freeze what the matched tokens never reach: the head, and the final norm unless matched after it.

    Only ``weco-kd``/``scratch-kd`` train them. They get no gradient, so the optimizer leaves them as they
    are either way, but DDP expects a gradient for every trainable parameter at every step.
    """
    for name in ("head", "fc_norm", "attn_pool", *(() if norm else ("norm",))):
        module = getattr(student, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False)


def make_optimizer(student: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """The paper's AdamW (betas 0.9, 0.95) on the trainable parameters, no decay on 1-D ones; one fused kernel."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(student, "adamw", lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95),
                               fused=device.type in ("cpu", "cuda"))


def plain_attention(device: torch.device, precision: str) -> bool:
    """Whether attention should run as plain matmuls: the CPU's bf16 fused-attention backward is ~10x slower."""
    return device.type == "cpu" and precision == "bf16"


def compile_by_default(device: torch.device) -> bool:
    """Whether ``torch.compile`` is on when not asked for: with CUDA, where it measured 1.24x faster on an H200
    (lean ViT-B/16 step, bf16), and only where its GPU code generator (Triton) is installed."""
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def training_view(student: nn.Module, student_blocks: list[int], norm: bool, *, device: torch.device,
                  precision: str, projector: WidthProjector | None = None) -> TokenMatcher:
    """What training calls: the student's lean view (fused adapter matmuls, the same parameters) returning
    the tokens the loss matches."""
    lean = lean_student(student)
    if plain_attention(device, precision):
        use_fused_attention([lean], False)
    return TokenMatcher(lean, student_blocks, norm, projector)


def trained_modules(student: nn.Module, projector: WidthProjector | None) -> nn.Module:
    """The student, with the width projector beside it when there is one (then named ``student.*`` and
    ``width_projector.*``; a student alone keeps its own parameter names, as checkpoints of earlier runs)."""
    return student if projector is None else nn.ModuleDict({"student": student, "width_projector": projector})


@dataclass
class Training:
    """A student ready to train: ``matcher`` is what a step calls, ``student`` what is saved and exported."""
    student: nn.Module
    matcher: TokenMatcher
    optimizer: torch.optim.Optimizer
    scheduler: object
    student_blocks: list[int]
    teacher_blocks: list[int]
    norm: bool
    channels: torch.Tensor | None = None  # the ``kept`` width loss: teacher channels compared (feature_loss)
    projector: WidthProjector | None = None  # the ``projection`` width loss

    @property
    def trained(self) -> nn.Module:
        """What the optimizer trains and a checkpoint holds (:func:`trained_modules`)."""
        return trained_modules(self.student, self.projector)

    @property
    def lean_adapters(self) -> bool:
        """Whether the step runs the fused adapter path (:func:`wecolora.method.adapters.lean_student`)."""
        return self.matcher.student is not self.student


def make_training(teacher: nn.Module, plan: StudentPlan, *, lr: float, weight_decay: float, epochs: int,
                  warmup_epochs: int, updates_per_epoch: int, device: torch.device, precision: str,
                  match: str = "last", dropout: float = 0.0, use_dora: bool = False,
                  use_rslora: bool = False, width_loss: str = "kept") -> Training:
    """The student of ``plan`` on ``device``, the blocks its loss matches, AdamW and the per-update schedule.

    A student with fewer residual channels than the teacher is compared with the teacher's tokens on its kept
    channels (``width_loss="kept"``) or through a learned projection to the teacher's width (``"projection"``,
    trained by the same optimizer).

    Example:
        >>> plan = plan_student(teacher, 2, mode="wecolora")   # doctest: +SKIP
        >>> t = make_training(teacher, plan, lr=4e-3, weight_decay=0.05, epochs=10, warmup_epochs=2,
        ...                   updates_per_epoch=13, device=torch.device("cpu"), precision="fp32")  # doctest: +SKIP
    """
    student = student_from_plan(teacher, plan, dropout=dropout, use_dora=use_dora, use_rslora=use_rslora).to(device)
    student_blocks, teacher_blocks, norm = matched_blocks(match, list(plan.segment_ends))
    freeze_unreached(student, norm)
    channels = projector = None
    if plan.narrow and plan.embed_dim < plan.width:  # fewer residual channels than the teacher's tokens have
        kept_channels = list(plan.width_choice.channels)
        if width_loss == "projection":
            projector = WidthProjector(kept_channels, plan.width, len(student_blocks)).to(device)
        else:
            channels = torch.tensor(kept_channels, device=device)
    optimizer = make_optimizer(trained_modules(student, projector), lr, weight_decay, device)
    scheduler = make_scheduler(optimizer, epochs, warmup_epochs, updates_per_epoch)
    matcher = training_view(student, student_blocks, norm, device=device, precision=precision, projector=projector)
    return Training(student, matcher, optimizer, scheduler, student_blocks, teacher_blocks, norm, channels, projector)
