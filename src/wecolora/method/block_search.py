"""Choosing the kept blocks from data (``--keep auto|greedy|influence``), before training.

A few hundred unlabeled images of the few-shot subset are split (seeded) into search images and scoring
images. The teacher's embedded tokens and last-block tokens (before the final norm, the method's target)
are computed once for both sets. Then:

- ``greedy``: start from the whole teacher and repeatedly drop the block whose removal raises least the
  L1 between the copy's last-block tokens and the teacher's: the method's own objective at step 0.
  The tokens entering each kept block are computed once per round, so trying to drop block j only reruns
  the kept blocks after it (O(L^2) forward passes in all).
- ``influence``: score each block by 1 - cos(input tokens, output tokens), averaged over tokens and search
  images, and keep the ceil(L/r) most influential (a block that barely changes its input is dropped).
- ``auto``: score the greedy set, the influence set, ``first`` and ``last`` by that initial L1 on the
  scoring images (never seen by the searches) and keep the best; ties go to the simpler rule, so auto is
  never worse than ``first`` by that measure.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from wecolora.config import KEEP_SEARCHES
from wecolora.errors import UserError

_logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class BlockChoice:
    """The outcome of a search: the kept blocks and what each scored candidate's initial L1 was."""
    method: str  # auto, greedy or influence
    kept: tuple[int, ...]
    chosen: str  # the candidate kept (for auto: first, last, greedy or influence)
    candidates: dict  # name -> {"kept": [...], "l1": initial L1 on the scoring images}
    search_images: int
    score_images: int
    seed: int

    def record(self) -> dict:
        return {"method": self.method, "chosen": self.chosen, "kept_blocks": list(self.kept),
                "candidates": self.candidates, "search_images": self.search_images,
                "score_images": self.score_images, "seed": self.seed,
                "score": "initial L1, copy vs teacher, last block before the final norm"}

    @classmethod
    def from_record(cls, record: dict) -> BlockChoice:
        """The choice a run recorded in its ``config.yaml`` (``resolved.block_search``)."""
        return cls(method=record["method"], kept=tuple(record["kept_blocks"]), chosen=record["chosen"],
                   candidates=record["candidates"], search_images=record["search_images"],
                   score_images=record["score_images"], seed=record["seed"])


# ---------------------------------------------------------------------------------------------
# The teacher, block by block (the same steps as timm's forward_features, without the final norm)


def embed(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens entering the first block, ``[B, N, D]``."""
    x = teacher.patch_embed(images)
    x = teacher._pos_embed(x)
    x = teacher.patch_drop(x)
    return teacher.norm_pre(x)


def run_blocks(teacher: nn.Module, blocks, x: torch.Tensor) -> torch.Tensor:
    for b in blocks:
        x = teacher.blocks[b](x)
    return x


@dataclass
class Tokens:
    """Per chunk of images: the embedded tokens and the teacher's last-block tokens, computed once."""
    embedded: list[torch.Tensor]
    targets: list[torch.Tensor]

    @property
    def count(self) -> int:
        return sum(len(x) for x in self.embedded)


@torch.inference_mode()
def teacher_tokens(teacher: nn.Module, images: torch.Tensor, batch_size: int = 64) -> Tokens:
    device = next(teacher.parameters()).device
    all_blocks = range(len(teacher.blocks))
    embedded, targets = [], []
    for chunk in images.split(batch_size):
        x = embed(teacher, chunk.to(device, torch.float32))
        embedded.append(x)
        targets.append(run_blocks(teacher, all_blocks, x))
    return Tokens(embedded, targets)


@torch.inference_mode()
def initial_l1(teacher: nn.Module, kept, tokens: Tokens) -> float:
    """Mean |copy - teacher| over images x tokens x channels: the distillation loss before any training."""
    total, numel = 0.0, 0
    for x, target in zip(tokens.embedded, tokens.targets):
        total += (run_blocks(teacher, kept, x) - target).abs().sum(dtype=torch.float64).item()
        numel += target.numel()
    return total / numel


# ---------------------------------------------------------------------------------------------
# The searches


@torch.inference_mode()
def greedy_removal(teacher: nn.Module, count: int, tokens: Tokens) -> list[int]:
    """Drop blocks one at a time, each time the one whose removal raises the copy's L1 least."""
    kept = list(range(len(teacher.blocks)))
    while len(kept) > count:
        errors = [0.0] * len(kept)
        for x, target in zip(tokens.embedded, tokens.targets):
            inputs = []  # inputs[i]: the tokens entering kept[i] in the current copy
            for b in kept:
                inputs.append(x)
                x = teacher.blocks[b](x)
            for i in range(len(kept)):  # without kept[i], its input goes straight to the blocks after it
                out = run_blocks(teacher, kept[i + 1:], inputs[i])
                errors[i] += (out - target).abs().sum(dtype=torch.float64).item()
        # Ties go to the earliest block, so the result depends on the numbers only.
        drop = min(range(len(kept)), key=lambda i: (errors[i], i))
        kept.pop(drop)
    return kept


@torch.inference_mode()
def block_influence(teacher: nn.Module, tokens: Tokens) -> list[float]:
    """Per teacher block: 1 - cos(input, output) per token, averaged over tokens and images."""
    sums = [0.0] * len(teacher.blocks)
    for x in tokens.embedded:
        for b, block in enumerate(teacher.blocks):
            y = block(x)
            sums[b] += (1 - torch.cosine_similarity(x, y, dim=-1)).sum(dtype=torch.float64).item()
            x = y
    tokens_seen = sum(x.shape[0] * x.shape[1] for x in tokens.embedded)
    return [s / tokens_seen for s in sums]


def most_influential(influence: list[float], count: int) -> list[int]:
    """The ``count`` blocks with the highest influence, in teacher order (ties: the earlier block).

    >>> most_influential([0.5, 0.1, 0.9, 0.3], 2)
    [0, 2]
    """
    order = sorted(range(len(influence)), key=lambda b: (-influence[b], b))
    return sorted(order[:count])


def split_images(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of n images: (search, scoring), a third for scoring.

    >>> [len(part) for part in split_images(384, 0)]
    [256, 128]
    """
    if n < 2:
        raise UserError(f"choosing blocks needs at least 2 images (search and scoring), got {n}: raise --ratio "
                        f"or --keep-images, or give first, last or a block list")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_score = max(1, n // 3)
    return order[n_score:], order[:n_score]


def choose_blocks(teacher: nn.Module, reduction: int, method: str, images: torch.Tensor, *, seed: int = 0,
                  batch_size: int = 64) -> BlockChoice:
    """Choose ceil(L / r) teacher blocks to keep from unlabeled images.

    Args:
        teacher: a timm VisionTransformer with its weights, on the device to search on.
        reduction: keep ceil(depth / r) blocks.
        method: one of :data:`wecolora.config.KEEP_SEARCHES`.
        images: ``[N, C, H, W]`` preprocessed images (the teacher's eval transform), N >= 2.
        seed: seeds the split into search and scoring images.

    Returns:
        The :class:`BlockChoice`; each scored candidate's initial L1 is measured on the scoring images.

    Example:
        >>> choice = choose_blocks(teacher, 2, "auto", images)   # doctest: +SKIP
        >>> choice.kept, choice.chosen, choice.candidates["first"]["l1"]   # doctest: +SKIP
    """
    from wecolora.method.blocks import check_reduction, select_blocks

    if method not in KEEP_SEARCHES:
        raise UserError(f"unknown block search {method!r}; choose from {', '.join(KEEP_SEARCHES)}")
    depth = len(teacher.blocks)
    count = check_reduction(depth, reduction)
    was_training = teacher.training
    teacher.eval()
    try:
        search_idx, score_idx = split_images(len(images), seed)
        search = teacher_tokens(teacher, images[search_idx], batch_size)
        score = teacher_tokens(teacher, images[score_idx], batch_size)
        sets = {"first": select_blocks(depth, reduction, "first")}
        last = select_blocks(depth, reduction, "last")
        if method == "auto" and len(last) == count:  # a smaller student (r not dividing L) is no fair rival
            sets["last"] = last
        if method in ("auto", "greedy"):
            sets["greedy"] = greedy_removal(teacher, count, search)
        if method in ("auto", "influence"):
            sets["influence"] = most_influential(block_influence(teacher, search), count)
        candidates = {name: {"kept": kept, "l1": initial_l1(teacher, kept, score)} for name, kept in sets.items()}
    finally:
        teacher.train(was_training)
    # auto keeps the lowest initial L1; on ties the earlier candidate (first, then last) wins.
    chosen = min(candidates, key=lambda name: candidates[name]["l1"]) if method == "auto" else method
    _logger.debug("keep %s: blocks %s (%s); initial L1 on %d scoring images: %s", method, candidates[chosen]["kept"],
                 chosen, score.count, ", ".join(f"{name} {c['l1']:.4g} {c['kept']}" for name, c in candidates.items()))
    return BlockChoice(method=method, kept=tuple(candidates[chosen]["kept"]), chosen=chosen, candidates=candidates,
                       search_images=search.count, score_images=score.count, seed=seed)


