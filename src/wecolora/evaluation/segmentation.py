"""The dense (segmentation) linear probe: a 1x1 head on a frozen model's patch tokens, scored by mIoU.

Features are the patch tokens after the model's final norm (``forward_features`` without the prefix
tokens, on the patch grid): what a user takes for a dense task. The head is the linear probe's made
dense: BatchNorm2d without affine (it normalises the features) + a 1x1 convolution, trained with MAE's
LARS on per-pixel cross-entropy of its logits upsampled (bilinear) to the mask size, pixels labelled 255
ignored. The tokens are extracted once and cached (fp16); the lr is settled as the linear probe's
(:func:`wecolora.evaluation.probe.resolve_settings`), a sweep scored by mIoU on held-aside training images.
"""
from __future__ import annotations

import functools
import logging
import time

import torch
from torch import nn
from torch.nn import functional as F

from wecolora.config import ProbeConfig, build_config
from wecolora.data.layout import BUILTIN_SEGMENTATION, IGNORE_INDEX
from wecolora.evaluation.features import cached_tokens
from wecolora.evaluation.metrics import confusion_matrix, segmentation_metrics
from wecolora.evaluation.probe import (
    EpochBatches,
    check_training,
    resolve_settings,
    split_validation,
    sweep_holdout,
    sweep_lr,
    train_head,
)
from wecolora.evaluation.splits import join_device, publish
from wecolora.files import check_writable
from wecolora.teachers.vit import model_fingerprint

_logger = logging.getLogger(__name__)

DEFAULT_BATCH = 64  # images a step: their upsampled logits (batch x classes x H x W floats) bound the memory


def segmentation_head(dim: int, num_classes: int) -> nn.Sequential:
    """The linear probe's head made dense: BatchNorm2d without affine + 1x1 conv (weight std 0.01, bias 0)."""
    head = nn.Sequential(nn.BatchNorm2d(dim, affine=False, eps=1e-6), nn.Conv2d(dim, num_classes, kernel_size=1))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


@functools.lru_cache(maxsize=16)
def _linear_weights(n: int, size: int) -> torch.Tensor:
    """``[size, n]``: row i holds the weights of the n inputs in output i of 1-D linear interpolation
    (PyTorch's, align_corners=False), taken from ``F.interpolate`` itself applied to the unit vectors."""
    return F.interpolate(torch.eye(n)[:, None, :], size=size, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits ``[B, C, rows, cols]`` on the patch grid, bilinearly upsampled to the mask size ``[B, C, H, W]``.

    The same numbers as ``F.interpolate(..., mode="bilinear", align_corners=False)`` (bilinear is linear
    along each axis in turn), as two small matrix products: twice as fast on the CPU, where this and the
    per-pixel loss are the head's whole cost.
    """
    rows = _linear_weights(logits.shape[-2], int(size[0])).to(logits)
    cols = _linear_weights(logits.shape[-1], int(size[1])).to(logits)
    return torch.einsum("bcij,hi,wj->bchw", logits, rows, cols)


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy of the head's logits upsampled to the masks ``[B, H, W]``, 255 ignored."""
    return F.cross_entropy(upsample(logits, masks.shape[-2:]), masks.long(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def score_segmentation(head: nn.Module, tokens: torch.Tensor, masks: torch.Tensor, num_classes: int, *,
                       device: torch.device, class_names: list[str] | None = None, chunk: int = 64) -> dict:
    """mIoU, pixel accuracy and per-class IoU of the head on ``tokens`` against ``masks`` (see
    :func:`~wecolora.evaluation.metrics.segmentation_metrics`), and ``loss``: the mean per-pixel cross-entropy."""
    head.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, pixels = 0.0, 0
    for t, m in zip(tokens.split(chunk), masks.split(chunk)):
        logits = upsample(head(t.to(device).float()), m.shape[-2:])
        labelled = int((m != IGNORE_INDEX).sum())
        loss_sum += F.cross_entropy(logits, m.to(device).long(), ignore_index=IGNORE_INDEX, reduction="sum").item()
        pixels += labelled
        confusion += confusion_matrix(logits.argmax(1).cpu(), m, num_classes, IGNORE_INDEX)
    return {**segmentation_metrics(confusion, class_names), "loss": loss_sum / max(pixels, 1)}


def train_segmentation_probe(
    train_tokens: torch.Tensor,
    train_masks: torch.Tensor,
    test_tokens: torch.Tensor,
    test_masks: torch.Tensor,
    *,
    num_classes: int,
    class_names: list[str] | None = None,
    config: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    **settings,
) -> dict:
    """Train the dense head on fixed token maps and score the last epoch on the test maps.

    Args:
        train_tokens, test_tokens: ``[N, D, rows, cols]`` token maps (any float dtype; fp16 stays fp16 in
            memory, each batch is made float32 on ``device``).
        train_masks, test_masks: ``[N, H, W]`` class indices, 255 ignored.
        num_classes: the head's outputs (mask values 0..num_classes-1).
        class_names: names of the per-class IoU entries.
        config: the probe's settings (epochs, batch size, lr, warmup, optimizer, val_fraction, seed);
            ``**settings`` builds one instead. Without an lr on a small set, a sweep scored by mIoU on 20% of
            the training images chooses it.
        device: where the head trains.

    Returns:
        ``miou``, ``pixel_accuracy``, ``per_class_iou``, ``val_miou`` when validating, ``n_train``, ``n_val``,
        ``n_test`` (images), ``feature_dim``, ``token_grid``, the loss record (``under_trained``...), the resolved
        settings and, when swept, ``lr_sweep`` and ``sweep_holdout``.
    """
    config = config or build_config(ProbeConfig, None, task="segmentation", **settings)
    device = torch.device(device)
    # Images, not classes, are held aside (a mask has no one class): the splits are random.
    fit_idx, val_idx = split_validation(len(train_masks), config.val_fraction, config.seed)
    resolved = resolve_settings(len(fit_idx), config, default_batch=DEFAULT_BATCH)

    def fit(rows: torch.Tensor, settings: dict):  # rows of train_tokens; batches are gathered, never the whole set
        sampler = EpochBatches(len(rows), min(settings["batch_size"], len(rows)), config.seed)
        batches = lambda: ((train_tokens[rows[i]].to(device).float(), train_masks[rows[i]].to(device))  # noqa: E731
                           for i in sampler)
        return train_head(lambda: segmentation_head(train_tokens.shape[1], num_classes), batches,
                          steps_per_epoch=len(sampler), settings=settings, loss_fn=pixel_loss, seed=config.seed,
                          device=device)  # fmt: skip

    swept = {}
    if resolved["lr"] is None:
        part, held = (fit_idx[i] for i in sweep_holdout(len(fit_idx), config.seed))

        def trial(lr: float) -> tuple[float, float]:
            head, _ = fit(part, {**resolved, "lr": lr})
            scores = score_segmentation(head, train_tokens[held], train_masks[held], num_classes, device=device)
            return scores["miou"], scores["loss"]

        resolved["lr"], records = sweep_lr(resolved.pop("lr_candidates"), trial, "miou")
        swept = {"lr_sweep": records, "sweep_holdout": len(held)}
    head, stats = fit(fit_idx, resolved)
    metrics = score_segmentation(head, test_tokens, test_masks, num_classes, device=device, class_names=class_names)
    metrics["test_loss"] = metrics.pop("loss")
    if val_idx is not None:
        metrics["val_miou"] = score_segmentation(head, train_tokens[val_idx], train_masks[val_idx], num_classes,
                                                 device=device)["miou"]  # fmt: skip
    return {**metrics, "n_train": len(fit_idx), "n_val": 0 if val_idx is None else len(val_idx),
            "n_test": len(test_masks), "num_classes": num_classes, "feature_dim": train_tokens.shape[1],
            "token_grid": list(train_tokens.shape[2:]), **stats, "under_trained": check_training(stats),
            **resolved, **swept}  # fmt: skip


def input_size(data: str, config: ProbeConfig) -> int | None:
    """The size the model runs at: ``--img-size``, else a built-in set's canvas, else (None) the model's own."""
    if config.img_size is not None:
        return config.img_size
    return BUILTIN_SEGMENTATION[data][2] if data in BUILTIN_SEGMENTATION else None


def segmentation_probe(model_spec: str, data: str, output: str, config: ProbeConfig, *, device: str = "auto") -> dict:
    """``wecolora probe --task segmentation``: the dense probe of a frozen model; writes ``output/results.json``.

    Args:
        model_spec: a run folder, a ``student/`` folder or a teacher spec.
        data: a built-in segmentation set (``fashion-mnist-seg``, ``mnist-5k-seg``) or a folder of image + mask
            pairs (see :mod:`wecolora.data.segmentation`).
        output: folder for ``results.json``.
        config: the probe's settings (``task: segmentation``).
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        The results written (``miou``, ``pixel_accuracy``, ``per_class_iou``, ``n_train``, ``n_test``, ...).

    Example:
        >>> results = segmentation_probe("bundled", "fashion-mnist-seg", "runs/seg", ProbeConfig(task="segmentation"))  # doctest: +SKIP
        >>> results["miou"], results["per_class_iou"]["background"]  # doctest: +SKIP
    """
    from wecolora.data.segmentation import open_segmentation
    from wecolora.data.transforms import segmentation_transform
    from wecolora.teachers.load import load_model

    out, (state, dev) = check_writable(output), join_device(device)
    size = input_size(data, config)
    model = load_model(model_spec, img_size=size)
    transform = segmentation_transform(model)
    train_ds = open_segmentation(data, "train", transform, max_unreadable=config.max_unreadable)
    test_ds = open_segmentation(data, "test", transform, classes=train_ds.classes, max_unreadable=config.max_unreadable)
    start = time.perf_counter()
    fingerprint = model_fingerprint(model)
    options = dict(data=data, cache_dir=config.cache_dir, fingerprint=fingerprint, batch_size=config.extract_batch_size,
                   device=dev, num_workers=config.num_workers)
    train, test = (cached_tokens(model, ds, split=split, **options) for ds, split in ((train_ds, "train"), (test_ds, "test")))
    metrics = train_segmentation_probe(train.tokens, train.masks, test.tokens, test.masks, num_classes=len(train_ds.classes),
                                       class_names=train_ds.classes, config=config, device=dev)  # fmt: skip
    results = {**metrics, "task": "segmentation", "protocol": config.protocol, "model": model_spec, "data": data,
               "img_size": list(transform.size), "token_bytes": train.nbytes + test.nbytes,
               "features_cached": train.from_cache and test.from_cache, "seed": config.seed, "device": str(dev),
               "processes": state.num_processes, "skipped_train": len(train_ds.skipped),
               "skipped_test": len(test_ds.skipped), "skipped_pairs": train_ds.skipped + test_ds.skipped,
               "seconds": time.perf_counter() - start}  # fmt: skip
    publish(state, out, results, f"segmentation probe {model_spec} on {data}")
    return results
