"""Training plumbing shared by ``distill`` and ``pretrain``: accelerator, schedule, run records."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import torch

from .errors import UserError

_logger = logging.getLogger(__name__)


def make_accelerator(device: str, precision: str | None, accum_steps: int = 1):
    """An ``accelerate.Accelerator`` for ``--device`` and ``--precision`` (bf16 on CUDA, fp32 on CPU)."""
    from accelerate import Accelerator

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu or auto")
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    precision = precision or ("fp32" if use_cpu else "bf16")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    if use_cpu and mixed == "fp16":
        raise UserError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return Accelerator(cpu=use_cpu, mixed_precision=mixed, gradient_accumulation_steps=accum_steps), precision


def loader_workers(requested: int | None) -> int:
    """``--num-workers``, or by default one worker per CPU thread torch uses, at most 8."""
    return requested if requested is not None else min(8, torch.get_num_threads())


def make_scheduler(optimizer, epochs: int, warmup_epochs: int, updates_per_epoch: int):
    """timm per-iteration schedule: linear warmup from 0 over ``warmup_epochs``, then half-cosine to 0."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=epochs - warmup_epochs, warmup_epochs=warmup_epochs, warmup_prefix=True,
        warmup_lr=0.0, min_lr=0.0, step_on_epochs=False, updates_per_epoch=updates_per_epoch,
    )
    scheduler.step_update(0)
    return scheduler


def resume_source(checkpoint_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` is the run's own ``checkpoint_dir``, a path is itself."""
    if resume == "auto":
        return checkpoint_dir
    return Path(resume) if resume else None


def resume_schedule(optimizer, scheduler, progress: dict, *, epochs: int, warmup_epochs: int,
                    updates_per_epoch: int, lr: float):
    """``(scheduler, updates)`` to continue a checkpointed run after ``progress['epoch']`` epochs.

    With the checkpoint's updates per epoch and peak lr, its restored schedule continues as it was. With
    another effective batch (world size, batch or accumulation), the schedule restarts at the same epoch
    with this run's updates per epoch and lr; the weights and optimizer moments carry over.
    """
    saved = progress.get("updates_per_epoch", updates_per_epoch), progress.get("lr", lr)
    if saved == (updates_per_epoch, lr):
        return scheduler, progress["updates"]
    _logger.warning("resuming with %d updates per epoch and lr %.3g (the checkpoint had %s and %.3g)",
                    updates_per_epoch, lr, saved[0], saved[1])
    for group in optimizer.param_groups:
        group["initial_lr"] = lr  # what the new schedule scales (the checkpoint's optimizer holds the old one)
    updates = progress["epoch"] * updates_per_epoch
    scheduler = make_scheduler(optimizer, epochs, warmup_epochs, updates_per_epoch)
    scheduler.step_update(updates)
    return scheduler, updates


def csv_text(rows: list[dict], columns, *, lineterminator: str = "\r\n") -> str:
    """CSV text of rows (``summary.csv``, ``results.csv``, ``report.csv``), columns in the given order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def versions() -> dict:
    """Library versions recorded with each run."""
    import accelerate
    import peft
    import timm

    return {"torch": str(torch.__version__), "timm": timm.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}
