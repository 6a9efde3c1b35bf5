"""The distillation loop: a frozen teacher, a weight-copied student, an L1 on last-block tokens.

Reads top to bottom: resolve settings -> build teacher, student, data -> optimizer and schedule ->
(resume) -> epochs of steps -> checkpoint each epoch -> export the merged student.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Subset
from tqdm.auto import tqdm

from . import data, losses, vit
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DistillConfig, to_yaml
from .errors import UserError
from .engine import make_accelerator, make_scheduler, summary_csv, versions
from .export import RUN_INFO, export_run
from .files import atomic_write_text
from .student import build_student, default_rank, get_mode, group_ends

_logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("epoch", "loss", "lr", "images_per_s", "seconds", "updates")


class TokenMatcher(nn.Module):
    """The student seen through the loss: ``forward(images)`` returns the tokens to match.

    Training calls this module's plain forward, so DDP wrapping (multi-GPU) sees every step.
    """

    def __init__(self, student: nn.Module, blocks: list[int], norm: bool):
        super().__init__()
        self.student, self.blocks, self.norm = student, blocks, norm

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return vit.last_block_tokens(self.student, images, self.blocks, norm=self.norm)


def check_output(config: DistillConfig) -> Path:
    """Refuse to clobber a finished or interrupted run unless asked to (``--overwrite``/``--resume``)."""
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a folder")
    finished = (output / "adapter" / RUN_INFO).is_file()
    interrupted = (output / "checkpoint").is_dir()
    if finished and not config.overwrite:
        raise UserError(f"{output} already holds a finished run; pass --overwrite to redo it or choose another --output")
    if interrupted and not (config.overwrite or config.resume):
        raise UserError(f"{output} holds an interrupted run; pass --resume auto to continue it or --overwrite to restart")
    if config.resume not in (None, "auto") and not Path(config.resume).is_dir():
        raise UserError(f"--resume {config.resume} is not a checkpoint folder")
    return output


def distill(config: DistillConfig) -> dict:
    """Run one distillation as configured; returns the last epoch's metrics and the run's paths.

    Example:
        >>> from wecolora.config import DistillConfig
        >>> distill(DistillConfig(teacher="local-dir:teacher", data="fashion-mnist", output="runs/a"))  # doctest: +SKIP
    """
    output = check_output(config)
    accelerator, precision = make_accelerator(config.device, config.precision, config.accum_steps)
    from accelerate.utils import set_seed

    set_seed(config.seed)
    mode = get_mode(config.mode)

    # Models: the teacher is frozen, in eval mode, never wrapped.
    teacher = vit.load_model(config.teacher, weights=config.teacher_weights, img_size=config.img_size)
    teacher.requires_grad_(False)
    rank = config.rank or default_rank(teacher.embed_dim) if mode.adapter_targets else None
    keep = config.keep_blocks()
    student = build_student(teacher, config.reduction, keep, config.mode, rank, alpha=config.lora_alpha,
                            dropout=config.lora_dropout, use_dora=config.dora, use_rslora=config.rslora)
    kept = student.wecolora_kept_blocks
    depth = len(teacher.blocks)
    student_blocks, teacher_blocks, norm = losses.matched_blocks(config.match, len(kept), group_ends(kept, depth, keep))

    # Data: the few-shot subset with the paper's augmentation and the teacher's own mean/std.
    dataset = data.open_dataset(config.data, "train", transform=data.train_transform(teacher))
    indices = data.few_shot_indices(dataset.targets, ratio=None if config.per_class else config.ratio,
                                    per_class=config.per_class, seed=config.subset_seed,
                                    min_per_class=config.min_per_class)
    subset = Subset(dataset, indices)
    generator = torch.Generator()  # reseeded every epoch: order and augmentation depend on (seed, epoch) only
    num_workers = config.num_workers if config.num_workers is not None else min(8, torch.get_num_threads())
    loader = DataLoader(subset, batch_size=config.batch_size, sampler=RandomSampler(subset, generator=generator),
                        generator=generator, num_workers=num_workers, pin_memory=accelerator.device.type == "cuda",
                        persistent_workers=False)

    # Optimisation: AdamW without decay on 1-D params, warmup from 0 then per-iteration cosine to 0.
    from timm.optim import create_optimizer_v2

    world = accelerator.num_processes
    peak_lr = config.peak_lr(world)
    optimizer = create_optimizer_v2(student, "adamw", lr=peak_lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    updates_per_epoch = math.ceil(math.ceil(len(subset) / (config.batch_size * world)) / config.accum_steps)
    scheduler = make_scheduler(optimizer, config.epochs, config.warmup_epochs, updates_per_epoch)
    model, optimizer, loader = accelerator.prepare(TokenMatcher(student, student_blocks, norm), optimizer, loader)
    teacher.to(accelerator.device)

    resolved = {
        "rank": rank, "lr": peak_lr, "precision": precision, "device": str(accelerator.device),
        "world_size": world, "effective_batch": config.effective_batch(world), "kept_blocks": kept,
        "teacher_blocks": depth, "matched_student_blocks": student_blocks, "matched_teacher_blocks": teacher_blocks,
        "images": len(subset), "updates_per_epoch": updates_per_epoch, "num_workers": num_workers,
        "versions": versions(),
    }
    start_epoch, updates, rows = 0, 0, []
    checkpoint_dir = output / "checkpoint"
    resume_from = checkpoint_dir if config.resume == "auto" else (Path(config.resume) if config.resume else None)
    if resume_from is not None and resume_from.is_dir():
        progress = load_checkpoint(resume_from, student, optimizer, scheduler)
        start_epoch, updates, rows = progress["epoch"], progress["updates"], progress["rows"]
        _logger.info("resuming from %s after epoch %d", resume_from, start_epoch)
    elif accelerator.is_main_process:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # --overwrite of an interrupted run
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "config.yaml", to_yaml(config, **resolved))
        data.write_subset(output / "subset.txt", dataset, indices)
        _logger.info("%s: %d of %d images, %d blocks kept of %d (%s), %s", config.mode, len(subset), len(dataset),
                     len(kept), depth, kept, mode.description)
        _logger.info("effective batch %d = %d x %d accumulation x %d processes; lr %.3g%s", config.effective_batch(world),
                     config.batch_size, config.accum_steps, world, peak_lr,
                     "" if config.lr else f" = blr {config.blr:g} x {config.effective_batch(world)} / 256")

    bar = tqdm(total=config.epochs * len(loader), initial=start_epoch * len(loader), unit="batch",
               disable=not accelerator.is_main_process, desc="distill")
    for epoch in range(start_epoch, config.epochs):
        set_seed(config.seed + epoch)
        generator.manual_seed(config.seed + epoch)
        metrics, updates = train_one_epoch(model, teacher, loader, optimizer, scheduler, accelerator, bar,
                                           teacher_blocks=teacher_blocks, norm=norm, loss_kind=config.loss,
                                           updates=updates, epoch=epoch)
        rows.append({"epoch": epoch + 1, **metrics, "updates": updates})
        if accelerator.is_main_process:
            atomic_write_text(output / "summary.csv", summary_csv(rows, SUMMARY_COLUMNS))
            save_checkpoint(checkpoint_dir, student, optimizer, scheduler,
                            {"epoch": epoch + 1, "updates": updates, "rows": rows})
        accelerator.wait_for_everyone()
    bar.close()

    info = {"teacher": config.teacher, "teacher_weights": config.teacher_weights, "mode": config.mode,
            "reduction": config.reduction, "keep": config.keep, "kept_blocks": kept, "rank": rank,
            "lora_alpha": config.lora_alpha if config.lora_alpha is not None else rank,
            "adapter_targets": list(mode.adapter_targets or ()), "match": config.match, "loss": config.loss}
    if accelerator.is_main_process:
        export_run(student, output, info)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return {"output": str(output), "epochs": rows, **info}


def train_one_epoch(model, teacher, loader, optimizer, scheduler, accelerator, bar, *, teacher_blocks, norm,
                    loss_kind, updates, epoch) -> tuple[dict, int]:
    """One pass over the subset; returns ``({loss, lr, images_per_s, seconds}, updates)``."""
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    images_seen, start = 0, time.perf_counter()
    for step, (images, _) in enumerate(loader):
        with accelerator.accumulate(model):
            with torch.no_grad(), accelerator.autocast():
                targets = vit.last_block_tokens(teacher, images, teacher_blocks, norm=norm)
            with accelerator.autocast():
                predictions = model(images)
            out = losses.feature_loss(predictions, targets, loss_kind)
            accelerator.backward(out["loss"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            updates += 1
            scheduler.step_update(updates)
        loss = out["loss"].detach()
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; the last good "
                            f"checkpoint is kept; lower --blr/--lr or use --precision fp32")
        loss_sum += loss
        images_seen += images.shape[0] * accelerator.num_processes
        rate = images_seen / (time.perf_counter() - start)
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f"{rate:.0f}")
    seconds = time.perf_counter() - start
    mean_loss = accelerator.reduce(loss_sum / max(1, step + 1), reduction="mean").item()
    return {"loss": mean_loss, "lr": optimizer.param_groups[0]["lr"], "images_per_s": images_seen / seconds,
            "seconds": seconds}, updates
