"""Training a teacher ViT from scratch (how the bundled teachers were made), on the distill machinery.

Two objectives share one loop (checkpoints, resume, ``summary.csv``):

- ``supervised`` (the ``bundled`` teacher): cross-entropy on the labels, shift + flip augmentation,
  test top-1 as the monitor.
- ``mae`` (the ``bundled-mae`` teacher): masked-autoencoder reconstruction (:mod:`wecolora.train.mae`), no
  labels, RandomResizedCrop + flip (done on the device for in-memory datasets, :mod:`wecolora.data.augment`);
  the monitor is a weighted kNN top-1 of the encoder's CLS feature, the only use of labels. Only the
  encoder is saved; the decoder lives in the checkpoints.

:func:`pretrain` reads top to bottom: claim the run folder -> the model, its objective, optimizer and schedule ->
(resume) -> epochs (:func:`pretrain_epoch`, one ``summary.csv`` row and a checkpoint each) -> save the model.

The model is any timm VisionTransformer architecture with size overrides; its preprocessing
metadata (mean/std measured on the training images, crop 1.0) is stored with it, so every later
command uses the teacher's own preprocessing.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, RandomSampler, Subset
from torchvision import transforms as T
from tqdm.auto import tqdm

from wecolora.config import MONITORS, PretrainConfig, to_yaml
from wecolora.data.augment import DeviceCropLoader, resize_normalize, stream_seed
from wecolora.data.datasets import ArrayDataset, open_dataset
from wecolora.data.transforms import eval_transform, train_transform
from wecolora.errors import UserError
from wecolora.export import save_student
from wecolora.runtime import loader_workers, make_accelerator, make_scheduler, versions
from wecolora.train.checkpoint import load_checkpoint, resume_schedule, save_checkpoint
from wecolora.train.mae import MaskedAutoencoder, fix_sincos_positions, mae_init
from wecolora.train.run_folder import RunFolder, claim_pretrain

_logger = logging.getLogger(__name__)

KNN_TRAIN, KNN_TEST = 10_000, 2_000  # evenly spaced images of each split in the MAE monitor (cheap, fixed)


def summary_columns(objective: str) -> tuple[str, ...]:
    return ("epoch", "loss", "lr", MONITORS[objective], "images_per_s", "seconds")


def measure_mean_std(dataset, limit: int = 5000) -> tuple[float, float]:
    """Grey-level mean and std over (up to) ``limit`` evenly spaced training images."""
    step = max(1, len(dataset) // limit)
    pixels = torch.stack([T.functional.pil_to_tensor(dataset[i][0])[0] for i in range(0, len(dataset), step)])
    pixels = pixels.float() / 255
    return pixels.mean().item(), pixels.std().item()


def create_vit(config: PretrainConfig, classes: list[str], mean: float, std: float):
    """The timm ViT to train (headless for MAE), with its preprocessing metadata in ``pretrained_cfg``, initialised
    as ``config.init`` says and with ``config.pos_embed``'s positions (MAE's by default for MAE)."""
    import timm

    num_classes = len(classes) if config.objective == "supervised" else 0
    model = timm.create_model(config.model, pretrained=False, num_classes=num_classes,
                              img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.embed_dim,
                              depth=config.depth, num_heads=config.num_heads)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (mean,) * 3, "std": (std,) * 3, "crop_pct": 1.0,
                            "interpolation": "bicubic", "input_size": (3, config.img_size, config.img_size),
                            "num_classes": num_classes, "tag": None, "hf_hub_id": None, "url": None}
    if num_classes:
        model.pretrained_cfg["label_names"] = classes
    else:
        model.pretrained_cfg.pop("label_names", None)
    if config.init == "mae":
        mae_init(model)
    if config.pos_embed == "sincos":  # after the init: fixed, never trained
        fix_sincos_positions(model)
    return model


@dataclass
class Objective:
    """What the two objectives do differently inside the one training loop."""
    module: torch.nn.Module  # trained and checkpointed (for MAE: encoder + decoder)
    batches: Iterable  # one epoch of training batches (prepared: this process's share)
    loss: Callable  # (prepared module, batch) -> scalar loss; the prepared (DDP) module syncs the gradients
    monitor: Callable[[], float]  # the label-using score at eval epochs
    start_epoch: Callable[[int], None]  # seeds an epoch's order, augmentation and masks


def supervised_objective(config, model, train_set, test_set, accelerator, generator, workers) -> Objective:
    """Cross-entropy with label smoothing on shifted + flipped images; test top-1 as the monitor."""
    normalize = [T.ToTensor(), T.Normalize(model.pretrained_cfg["mean"], model.pretrained_cfg["std"])]
    train_set.transform = T.Compose([T.Resize(config.img_size), T.RandomCrop(config.img_size, padding=config.shift),
                                     T.RandomHorizontalFlip(), *normalize])
    test_set.transform = eval_transform(model)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=RandomSampler(train_set, generator=generator),
                        generator=generator, num_workers=workers, drop_last=True,
                        pin_memory=accelerator.device.type == "cuda")
    test_loader = accelerator.prepare(DataLoader(test_set, batch_size=512, num_workers=workers))  # sharded

    def loss(module, batch):
        images, labels = batch
        return F.cross_entropy(module(images), labels, label_smoothing=config.label_smoothing)

    def start_epoch(epoch):
        set_seed(config.seed + epoch, device_specific=True)  # each process draws its own augmentations
        generator.manual_seed(config.seed + epoch)  # the same order everywhere; accelerate shards it

    return Objective(model, loader, loss, lambda: evaluate_top1(model, test_loader, accelerator), start_epoch)


def mae_objective(config, model, train_set, test_set, accelerator, generator, workers) -> Objective:
    """Masked-autoencoder reconstruction; no labels except in the kNN monitor."""
    mae = MaskedAutoencoder(model, mask_ratio=config.mask_ratio, decoder_dim=config.decoder_dim,
                            decoder_depth=config.decoder_depth, norm_pix_loss=config.norm_pix_loss)
    device, rank = accelerator.device, accelerator.process_index
    if isinstance(train_set, ArrayDataset):  # in memory: crop and flip whole batches on the device
        batches = DeviceCropLoader(torch.tensor(train_set.images, device=device), batch_size=config.batch_size,
                                   size=config.img_size, mean=model.pretrained_cfg["mean"],
                                   std=model.pretrained_cfg["std"], num_processes=accelerator.num_processes,
                                   process_index=rank)
    else:  # image folders: the paper's augmentation through the PIL loader, labels dropped in loss()
        train_set.transform = train_transform(model)
        batches = DataLoader(train_set, batch_size=config.batch_size,
                             sampler=RandomSampler(train_set, generator=generator), generator=generator,
                             num_workers=workers, drop_last=True, pin_memory=device.type == "cuda")
    masks = torch.Generator(device=device)

    def loss(module, batch):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return module(images, masks)["loss"]

    def start_epoch(epoch):
        set_seed(config.seed + epoch, device_specific=True)  # the PIL path's augmentations
        generator.manual_seed(config.seed + epoch)  # the PIL path's order, the same everywhere
        if isinstance(batches, DeviceCropLoader):
            batches.set_seed(stream_seed(config.seed, epoch))
        masks.manual_seed(stream_seed(config.seed, epoch, 1, rank))  # each process masks its own images

    monitor_sets = [knn_monitor_set(config.data, split, limit, model, device, workers)
                    for split, limit in (("train", KNN_TRAIN), ("test", KNN_TEST))]
    return Objective(mae, batches, loss, lambda: knn_top1(model, *monitor_sets, accelerator), start_epoch)


OBJECTIVE_SETUPS = {"supervised": supervised_objective, "mae": mae_objective}


def pretrain(config: PretrainConfig) -> dict:
    """Train a ViT on ``config.data``; writes ``DIR/model`` (a timm folder), ``summary.csv`` and ``config.yaml``.

    Example:
        >>> pretrain(PretrainConfig(data="mnist-5k", output="runs/t", objective="mae", depth=2, epochs=2))
    """
    with claim_pretrain(config) as run:  # locked against another run; a finished or interrupted run needs asking
        accelerator, precision = make_accelerator(config.device, config.precision)
        set_seed(config.seed)
        job = make_pretraining(config, run, accelerator)
        start_epoch, updates, rows = resume(job)
        if accelerator.is_main_process:
            run.write_config(to_yaml(config, lr=job.peak_lr, precision=precision, mean=job.mean, std=job.std,
                                     device=str(accelerator.device), versions=versions(),
                                     world_size=accelerator.num_processes))
            batch = config.batch_size * accelerator.num_processes
            rule = ("--lr, absolute" if config.lr is not None else
                    f"MAE's rule: blr {config.blr:g} x {batch} / 256" if config.objective == "mae" else
                    "the supervised recipe's, absolute")
            _logger.info("effective batch %d = %d x %d processes; lr %.3g (%s); positions %s, init %s", batch,
                         config.batch_size, accelerator.num_processes, job.peak_lr, rule, config.pos_embed,
                         config.init)
        rows = train_epochs(job, start_epoch, updates, rows)
        if accelerator.is_main_process:
            save_student(job.model.float().eval(), run.path / "model")  # for MAE: the encoder alone, headless
            run.finish()
        accelerator.wait_for_everyone()  # the model is written before any process returns
        monitor = MONITORS[config.objective]
        return {"output": str(run.path), "objective": config.objective, monitor: rows[-1][monitor], "epochs": rows}


@dataclass
class Pretraining:
    """Everything a pretraining's epochs use, made by :func:`make_pretraining`."""
    config: PretrainConfig
    run: RunFolder
    accelerator: object
    model: torch.nn.Module  # the ViT saved at the end (for MAE: the encoder)
    mean: float
    std: float
    objective: Objective
    module: torch.nn.Module  # the prepared objective.module a step calls
    optimizer: torch.optim.Optimizer  # prepared
    scheduler: object
    batches: Iterable  # this process's share of an epoch's batches: len() is the updates per epoch
    peak_lr: float  # MAE: its rule on the effective batch, unless --lr


def make_pretraining(config: PretrainConfig, run: RunFolder, accelerator) -> Pretraining:
    """The ViT (preprocessing measured on the training images), its objective, AdamW and the per-update schedule."""
    from timm.optim import create_optimizer_v2

    train_set = open_dataset(config.data, "train")
    test_set = open_dataset(config.data, "test")
    mean, std = measure_mean_std(train_set)
    model = create_vit(config, train_set.classes, mean, std)
    generator, workers = torch.Generator(), loader_workers(config.num_workers)
    objective = OBJECTIVE_SETUPS[config.objective](config, model, train_set, test_set, accelerator, generator, workers)
    # MAE's AdamW betas (0.9, 0.95); the supervised recipe keeps timm's defaults.
    betas = {"betas": (0.9, 0.95)} if config.objective == "mae" else {}
    peak_lr = config.peak_lr(accelerator.num_processes)  # MAE: its rule on the effective batch, unless --lr
    optimizer = create_optimizer_v2(objective.module, "adamw", lr=peak_lr, weight_decay=config.weight_decay, **betas)
    module, optimizer = accelerator.prepare(objective.module, optimizer)
    batches = objective.batches
    if isinstance(batches, DataLoader):
        batches = accelerator.prepare(batches)  # shards the batches; the device loader shards itself
    # After prepare, len(batches) is this process's share of the batches: the number of updates per epoch.
    scheduler = make_scheduler(optimizer, config.epochs, config.warmup_epochs, len(batches))
    return Pretraining(config, run, accelerator, model, mean, std, objective, module, optimizer, scheduler, batches,
                       peak_lr)


def resume(job: Pretraining) -> tuple[int, int, list[dict]]:
    """``(epochs done, updates done, summary rows)``: the checkpoint's with ``--resume``, else a fresh start's."""
    source = job.run.resume_from
    if source is None:
        return 0, 0, []
    progress = load_checkpoint(source, job.accelerator.unwrap_model(job.module), job.optimizer, job.scheduler)
    job.scheduler, updates = resume_schedule(job.optimizer, job.scheduler, progress, epochs=job.config.epochs,
                                             lr=job.peak_lr, warmup_epochs=job.config.warmup_epochs,
                                             updates_per_epoch=len(job.batches))
    return progress["epoch"], updates, progress["rows"]


def train_epochs(job: Pretraining, start_epoch: int, updates: int, rows: list[dict]) -> list[dict]:
    """Epochs ``start_epoch + 1`` to the last; after each, the first process writes ``summary.csv`` and the
    checkpoint. Returns every epoch's row."""
    config, accelerator, batches = job.config, job.accelerator, job.batches
    monitor, columns = MONITORS[config.objective], summary_columns(config.objective)
    bar = tqdm(total=config.epochs * len(batches), initial=start_epoch * len(batches), unit="batch",
               disable=not accelerator.is_main_process, desc=f"pretrain ({config.objective})")
    for epoch in range(start_epoch, config.epochs):
        row, updates = pretrain_epoch(job, epoch, updates, bar)
        rows.append(row)
        bar.set_postfix(epoch=epoch + 1, loss=f"{row['loss']:.3f}", img_s=f"{row['images_per_s']:.0f}",
                        **{monitor: f"{row.get(monitor, math.nan):.4f}"})
        if accelerator.is_main_process:
            job.run.write_summary(rows, columns)
            save_checkpoint(job.run.checkpoint, accelerator.unwrap_model(job.module), job.optimizer, job.scheduler,
                            {"epoch": epoch + 1, "updates": updates, "rows": rows,
                             "updates_per_epoch": len(batches), "lr": job.peak_lr})
        accelerator.wait_for_everyone()
    bar.close()
    return rows


def pretrain_epoch(job: Pretraining, epoch: int, updates: int, bar) -> tuple[dict, int]:
    """One pass over the training batches; returns ``(row, updates)``, the row with the monitor at eval epochs.
    A loss that stops being finite ends the run with one line."""
    config, accelerator, batches, objective = job.config, job.accelerator, job.batches, job.objective
    objective.start_epoch(epoch)
    job.module.train()
    loss_sum, start = torch.zeros((), device=accelerator.device), time.perf_counter()
    for batch in batches:
        with accelerator.autocast():
            loss = objective.loss(job.module, batch)
        if not torch.isfinite(loss):
            checkpoint = job.run.checkpoint
            kept = f"the last checkpoint is in {checkpoint}" if checkpoint.is_dir() else "no checkpoint yet"
            raise UserError(f"the loss became {loss.item()} at epoch {epoch + 1}, update {updates + 1}; {kept}; "
                            f"rerun with a lower --lr")
        accelerator.backward(loss)
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        updates += 1
        job.scheduler.step_update(updates)
        loss_sum += loss.detach()
        bar.update(1)
    seconds = time.perf_counter() - start
    row = {"epoch": epoch + 1, "loss": accelerator.reduce(loss_sum, "mean").item() / len(batches),
           "lr": job.optimizer.param_groups[0]["lr"], "seconds": seconds,
           "images_per_s": len(batches) * config.batch_size * accelerator.num_processes / seconds}
    if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
        row[MONITORS[config.objective]] = objective.monitor()
    return row, updates


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


def knn_monitor_set(spec: str, split: str, limit: int, model, device: torch.device, workers: int):
    """Batches ``(images, labels)`` of up to ``limit`` evenly spaced images of a split, the same at every eval.

    In-memory datasets are preprocessed once on the device (resize to the input size, normalise); image
    folders are read through the model's eval transform at each eval, by a dataset of their own so that
    the training set keeps its augmentation.
    """
    dataset = open_dataset(spec, split)
    rows = list(range(0, len(dataset), max(1, math.ceil(len(dataset) / limit))))
    if isinstance(dataset, ArrayDataset):
        cfg = model.pretrained_cfg
        images = resize_normalize(torch.tensor(dataset.images[rows], device=device), model.patch_embed.img_size[0],
                                  cfg["mean"], cfg["std"])
        labels = torch.tensor([dataset.targets[i] for i in rows], device=device)
        return list(zip(images.split(512), labels.split(512)))
    dataset.transform = eval_transform(model)
    return DataLoader(Subset(dataset, rows), batch_size=512, num_workers=workers)


@torch.inference_mode()
def knn_top1(model, train_batches, test_batches, accelerator) -> float:
    """Weighted kNN (k 20, T 0.07) top-1 of the final-norm CLS feature: test slice vs train slice.

    Every process computes it alike (a few thousand images), so nothing is gathered.
    """
    from wecolora.evaluation.features import pool_tokens
    from wecolora.evaluation.knn import knn_classify

    model.eval()
    features, labels = [], []
    for batches in (train_batches, test_batches):
        chunks, targets = [], []
        for images, y in batches:
            with accelerator.autocast():
                chunks.append(pool_tokens(model, images.to(accelerator.device), "cls").float())
            targets.append(y.to(accelerator.device))
        features.append(torch.cat(chunks))
        labels.append(torch.cat(targets))
    scores = knn_classify(features[0], labels[0], features[1], num_classes=int(torch.cat(labels).max()) + 1)
    return (scores.argmax(dim=1) == labels[1]).float().mean().item()
