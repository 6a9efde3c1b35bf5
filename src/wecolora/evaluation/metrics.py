"""Scores of a trained head: top-1/top-5 for single-label sets, mean ROC-AUC over labels for multi-label ones."""
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
