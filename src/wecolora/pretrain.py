"""Supervised training of a teacher ViT (how the bundled teacher was made), on the distill machinery.

The model is any timm VisionTransformer architecture with size overrides; its preprocessing
metadata (mean/std measured on the training images, crop 1.0) is stored with it, so every later
command uses the teacher's own preprocessing.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler
from torchvision import transforms as T
from tqdm.auto import tqdm

from . import data
from .checkpoint import load_checkpoint, save_checkpoint
from .checks import check_pretrain
from .config import DEVICES, PRECISIONS, _check, resolve_warmup, to_yaml
from .engine import (csv_text, loader_workers, make_accelerator, make_scheduler, resume_schedule, resume_source,
                     versions)
from .errors import UserError
from .export import save_student
from .files import atomic_write_text

_logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("epoch", "loss", "lr", "test_top1", "images_per_s", "seconds")
PRETRAIN_WARMUP_EPOCHS = 5  # the bundled teacher's recipe


@dataclass
class PretrainConfig:
    """A supervised ViT training run (defaults: the bundled Fashion-MNIST teacher's recipe)."""
    data: str
    output: str
    model: str = "vit_tiny_patch16_224"  # timm architecture; the size settings below override it
    img_size: int = 28
    patch_size: int = 7
    embed_dim: int = 128
    depth: int = 12
    num_heads: int = 4
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    warmup_epochs: int | None = None  # default: 5, shortened to fit a run of fewer than 6 epochs
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    shift: int = 2  # random translation in pixels (pad + random crop)
    eval_every: int = 5
    seed: int = 0
    precision: str | None = None
    device: str = "auto"
    num_workers: int | None = None
    resume: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "epochs", "batch_size", "eval_every"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        _check(self.img_size % self.patch_size == 0, "patch_size", self.patch_size, f"a divisor of --img-size {self.img_size}")
        _check(self.embed_dim % self.num_heads == 0, "num_heads", self.num_heads, f"a divisor of --embed-dim {self.embed_dim}")
        self.warmup_epochs = resolve_warmup(self.warmup_epochs, self.epochs, PRETRAIN_WARMUP_EPOCHS)
        _check(self.lr > 0, "lr", self.lr, "a positive number")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "a value in [0, 1)")
        _check(self.shift >= 0, "shift", self.shift, "an integer >= 0")
        _check(self.precision in (None, *PRECISIONS), "precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        _check(self.device in DEVICES, "device", self.device, f"one of {', '.join(DEVICES)}")


def measure_mean_std(dataset, limit: int = 5000) -> tuple[float, float]:
    """Grey-level mean and std over (up to) ``limit`` evenly spaced training images."""
    step = max(1, len(dataset) // limit)
    pixels = torch.stack([T.functional.pil_to_tensor(dataset[i][0])[0] for i in range(0, len(dataset), step)])
    pixels = pixels.float() / 255
    return pixels.mean().item(), pixels.std().item()


def pretrain(config: PretrainConfig) -> dict:
    """Train a ViT classifier on ``config.data``; writes ``DIR/model`` (a timm folder) and ``summary.csv``."""
    import timm
    from accelerate.utils import set_seed
    from timm.optim import create_optimizer_v2

    output = check_pretrain(config)  # paths, a finished or interrupted run in --output
    accelerator, precision = make_accelerator(config.device, config.precision)
    set_seed(config.seed)

    train_set = data.open_dataset(config.data, "train")
    test_set = data.open_dataset(config.data, "test")
    mean, std = measure_mean_std(train_set)
    model = timm.create_model(config.model, pretrained=False, num_classes=len(train_set.classes),
                              img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.embed_dim,
                              depth=config.depth, num_heads=config.num_heads)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (mean,) * 3, "std": (std,) * 3, "crop_pct": 1.0,
                            "interpolation": "bicubic", "input_size": (3, config.img_size, config.img_size),
                            "num_classes": len(train_set.classes), "label_names": train_set.classes,
                            "tag": None, "hf_hub_id": None, "url": None}
    normalize = [T.ToTensor(), T.Normalize((mean,) * 3, (std,) * 3)]
    train_set.transform = T.Compose([T.Resize(config.img_size), T.RandomCrop(config.img_size, padding=config.shift),
                                     T.RandomHorizontalFlip(), *normalize])
    test_set.transform = data.eval_transform(model)

    generator = torch.Generator()
    workers = loader_workers(config.num_workers)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=RandomSampler(train_set, generator=generator),
                        generator=generator, num_workers=workers, drop_last=True,
                        pin_memory=accelerator.device.type == "cuda")
    test_loader = DataLoader(test_set, batch_size=512, num_workers=workers)
    optimizer = create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer, loader, test_loader = accelerator.prepare(model, optimizer, loader, test_loader)
    # After prepare, len(loader) is this process's share of the batches: the number of updates per epoch.
    scheduler = make_scheduler(optimizer, config.epochs, config.warmup_epochs, len(loader))
    raw_model = accelerator.unwrap_model(model)

    start_epoch, updates, rows = 0, 0, []
    checkpoint_dir = output / "checkpoint"
    resume_from = resume_source(checkpoint_dir, config.resume)
    if resume_from is not None and resume_from.is_dir():
        progress = load_checkpoint(resume_from, raw_model, optimizer, scheduler)
        start_epoch, rows = progress["epoch"], progress["rows"]
        scheduler, updates = resume_schedule(optimizer, scheduler, progress, epochs=config.epochs, lr=config.lr,
                                             warmup_epochs=config.warmup_epochs, updates_per_epoch=len(loader))
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "config.yaml", to_yaml(config, precision=precision, mean=mean, std=std,
                                                          device=str(accelerator.device), versions=versions(),
                                                          world_size=accelerator.num_processes))
        _logger.info("effective batch %d = %d x %d processes; lr %.3g (absolute: --lr is not scaled with the batch)",
                     config.batch_size * accelerator.num_processes, config.batch_size, accelerator.num_processes,
                     config.lr)
    bar = tqdm(total=config.epochs * len(loader), initial=start_epoch * len(loader), unit="batch",
               disable=not accelerator.is_main_process, desc="pretrain")
    for epoch in range(start_epoch, config.epochs):
        set_seed(config.seed + epoch, device_specific=True)  # each process draws its own augmentations
        generator.manual_seed(config.seed + epoch)  # the same order everywhere; accelerate shards it
        model.train()
        loss_sum, start = torch.zeros((), device=accelerator.device), time.perf_counter()
        for images, labels in loader:
            with accelerator.autocast():
                loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
            if not torch.isfinite(loss):
                kept = f"the last checkpoint is in {checkpoint_dir}" if checkpoint_dir.is_dir() else "no checkpoint yet"
                raise UserError(f"the loss became {loss.item()} at epoch {epoch + 1}, update {updates + 1}; {kept}; "
                                f"rerun with a lower --lr")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            scheduler.step_update(updates)
            loss_sum += loss.detach()
            bar.update(1)
        seconds = time.perf_counter() - start
        row = {"epoch": epoch + 1, "loss": accelerator.reduce(loss_sum, "mean").item() / len(loader),
               "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
               "images_per_s": len(loader) * config.batch_size * accelerator.num_processes / seconds}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            row["test_top1"] = evaluate_top1(model, test_loader, accelerator)
        rows.append(row)
        bar.set_postfix(epoch=epoch + 1, loss=f"{row['loss']:.3f}", top1=f"{row.get('test_top1', math.nan):.4f}")
        if accelerator.is_main_process:
            atomic_write_text(output / "summary.csv", csv_text(rows, SUMMARY_COLUMNS))
            save_checkpoint(checkpoint_dir, raw_model, optimizer, scheduler, {"epoch": epoch + 1, "updates": updates, "rows": rows,
                                                                              "updates_per_epoch": len(loader), "lr": config.lr})
        accelerator.wait_for_everyone()
    bar.close()
    if accelerator.is_main_process:
        save_student(raw_model.float().eval(), output / "model")
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()  # the model is written before any process returns
    return {"output": str(output), "test_top1": rows[-1]["test_top1"], "epochs": rows}


@torch.inference_mode()
def evaluate_top1(model, loader, accelerator) -> float:
    """Top-1 accuracy (fraction) over a prepared loader, gathered across processes."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with accelerator.autocast():
            predictions = model(images).argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    return correct / max(1, total)
