"""Scores of a trained head: top-1/top-5 for single-label sets, mean ROC-AUC over labels for multi-label ones,
and mIoU, pixel accuracy and per-class IoU from a confusion matrix for the dense probe."""
from __future__ import annotations

import numpy as np
import torch

from wecolora.errors import UserError


def multilabel_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean ROC-AUC over labels (ties count one half), skipping labels with only one class present.

    Args:
        scores: ``[N, C]`` any real scores.
        targets: ``[N, C]`` multi-hot 0/1.

    Returns:
        The mean AUC over the labels that have both positives and negatives.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    aucs = []
    for s, positive in zip(scores.T, targets.T):
        n_pos = int(positive.sum())
        n_neg = len(positive) - n_pos
        if n_pos and n_neg:
            # Mann-Whitney U from average ranks: AUC = (rank sum of positives - n_pos(n_pos+1)/2) / (n_pos n_neg).
            aucs.append((_average_ranks(s)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    if not aucs:
        raise UserError("no label has both positive and negative test images, so ROC-AUC is undefined")
    return float(np.mean(aucs))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the average of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts_group = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2)[group]
    return ranks


def classification_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """Top-1/top-5 accuracy (fractions) for ``[N]`` labels; for ``[N, C]`` multi-hot also mean ROC-AUC.

    For multi-label targets, top-1 is precision at 1 (the highest score is a positive) and top-5
    whether a positive is among the five highest.
    """
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # [N, 5]
    if targets.ndim == 2:
        hits = targets.gather(1, top) > 0.5
        return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(1).float().mean().item(),
                "auc": multilabel_auc(scores, targets)}  # fmt: skip
    hits = top == targets[:, None]
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(1).float().mean().item()}


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """``[C, C]`` pixel counts, row = true class, column = predicted class; ``ignore_index`` pixels left out.

    Args:
        predictions, targets: class indices of the same shape (any), e.g. ``[B, H, W]``.
    """
    keep = targets != ignore_index
    truth, guess = targets[keep].long(), predictions[keep].long()
    return torch.bincount(truth * num_classes + guess, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mIoU, pixel accuracy and per-class IoU of a confusion matrix (rows true, columns predicted).

    IoU of class c = TP / (TP + FP + FN). A class absent from both the truth and the predictions has no
    IoU (None) and is left out of the mean, as in mmsegmentation's nan-mean.

    Returns:
        ``miou`` (0..1), ``pixel_accuracy`` (0..1), ``per_class_iou`` ({name: IoU or None}), ``pixels``.

    Example:
        >>> segmentation_metrics(torch.tensor([[3, 1], [0, 2]]))["miou"]  # IoU 3/4 and 2/3
        0.7083333333333333
    """
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    names = class_names or [str(c) for c in range(len(confusion))]
    ious = [None if u == 0 else (h / u).item() for h, u in zip(hits, union)]
    present = [iou for iou in ious if iou is not None]
    total = confusion.sum().item()
    if not present or total == 0:
        raise UserError("no labelled pixel to score: every test pixel is 255 (ignored)")
    return {"miou": float(np.mean(present)), "pixel_accuracy": hits.sum().item() / total,
            "per_class_iou": dict(zip(names, ious)), "pixels": int(total)}
