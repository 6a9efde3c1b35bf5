"""What every loop needs, settled in one place: the device, the accelerator and precision, data-loader workers,
the warmup + cosine schedule, and the library versions recorded with each run."""
from __future__ import annotations

import logging

import torch

from wecolora.config import DEVICES
from wecolora.errors import UserError

_logger = logging.getLogger(__name__)


def make_accelerator(device: str, precision: str | None, accum_steps: int = 1):
    """An ``accelerate.Accelerator`` for ``--device`` and ``--precision`` (bf16 on CUDA, fp32 on CPU)."""
    from accelerate import Accelerator

    use_cpu = resolve_device(device).type == "cpu"
    precision = precision or ("fp32" if use_cpu else "bf16")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    if use_cpu and mixed == "fp16":
        raise UserError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return Accelerator(cpu=use_cpu, mixed_precision=mixed, gradient_accumulation_steps=accum_steps), precision


def loader_workers(requested: int | None) -> int:
    """``--num-workers``, or by default one worker per CPU thread torch uses, at most 8."""
    return requested if requested is not None else min(8, torch.get_num_threads())


def make_scheduler(optimizer, epochs: int, warmup_epochs: int, updates_per_epoch: int):
    """timm per-iteration schedule: linear warmup from 0 over ``warmup_epochs``, then half-cosine to 0.

    The one schedule of the project: distillation, pre-training and the probe heads all use it.
    """
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=epochs - warmup_epochs, warmup_epochs=warmup_epochs, warmup_prefix=True,
        warmup_lr=0.0, min_lr=0.0, step_on_epochs=False, updates_per_epoch=updates_per_epoch,
    )
    scheduler.step_update(0)
    return scheduler


def versions() -> dict:
    """Library versions recorded with each run."""
    import accelerate
    import peft
    import timm

    return {"torch": str(torch.__version__), "timm": timm.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}


def resolve_device(device: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; asking for an absent cuda is a user error."""
    if device not in DEVICES:
        raise UserError(f"--device {device!r} is invalid: expected one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return torch.device(device)
