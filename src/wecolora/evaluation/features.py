"""Frozen-backbone features for probing: pooling, patch-token maps, batched extraction and an on-disk cache.

A cache entry is one safetensors file per (model weights, dataset, split, transform, pooling), so a
second probe or kNN of the same model on the same data reads the features instead of recomputing them.
The dense probe's entries hold every image's patch tokens (fp16, ``N x D x grid``) with its mask.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wecolora.config import POOLINGS
from wecolora.distributed import all_agree, batch_shard, gather_batches, process_state
from wecolora.errors import UserError
from wecolora.files import atomic_write_bytes, cache_folder
from wecolora.teachers.vit import model_fingerprint

_logger = logging.getLogger(__name__)


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The feature cache folder: the argument, else ``$WECOLORA_CACHE_DIR/features``, else ``~/.cache/wecolora/features``."""
    return cache_folder("features", cache_dir)


def pool_tokens(model: nn.Module, images: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """One feature vector per image, ``[B, D]``, from the tokens after the model's final norm.

    Args:
        model: a timm model with ``forward_features`` (``[B, N, D]`` tokens, final norm applied).
        images: ``[B, 3, H, W]`` preprocessed images.
        pooling: ``cls``: the class token. Models without one fall back to their own pooling
            (``forward_head(..., pre_logits=True)``, e.g. average of patch tokens + ``fc_norm``), or
            the mean of the patch tokens when that yields no vector. ``mean``: mean of the patch
            tokens (prefix tokens such as class and register tokens excluded).

    Returns:
        ``[B, D]`` features.
    """
    tokens = model.forward_features(images)
    if tokens.ndim == 2:  # already pooled (non-token models)
        return tokens
    prefix = getattr(model, "num_prefix_tokens", 0)
    if pooling == "cls":
        if getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None):
            return tokens[:, 0]
        if hasattr(model, "forward_head"):
            pooled = model.forward_head(tokens, pre_logits=True)
            if pooled.ndim == 2:
                return pooled
    return tokens[:, prefix:].mean(dim=1)


def extract_features(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    pooling: str = "cls",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen ``model`` over ``dataset`` once and pool its tokens (see :func:`pool_tokens`).

    The model is put in eval mode and moved to ``device``.

    Args:
        model: the frozen backbone.
        dataset: yields ``(image tensor, label)``; labels are ints or multi-hot vectors.
        pooling: one of :data:`POOLINGS`.
        batch_size: images per forward pass.
        device: where the forward passes run.
        num_workers: DataLoader worker processes.
        desc: label of the tqdm progress bar.

    Returns:
        ``(features [N, D] float32, labels [N] int64 or [N, C] float32)``, both on the CPU.
    """
    if pooling not in POOLINGS:
        raise UserError(f"pooling {pooling!r} is invalid: expected one of {', '.join(POOLINGS)}")
    if len(dataset) == 0:
        raise UserError(f"cannot extract {desc}: the dataset holds no images")
    batches = _run_batches(model, dataset, lambda images: pool_tokens(model, images, pooling).float(),
                           batch_size=batch_size, device=device, num_workers=num_workers, desc=desc)
    features, labels = [f for f, _ in batches], [t for _, t in batches]
    targets = torch.cat(labels)
    targets = targets.float() if targets.ndim == 2 else targets.long()
    return torch.cat(features), targets


def _run_batches(model: nn.Module, dataset, compute, *, batch_size: int, device, num_workers: int, desc: str) -> list:
    """``(compute(images) on the CPU, targets)`` of every batch of ``dataset`` in order, the model in eval mode."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    model.eval().to(device)
    # Under torchrun each process runs its own whole batches (the ones a single process would run), and
    # the per-batch results are gathered back in dataset order.
    state = process_state()
    shard = batch_shard(len(dataset), batch_size, state)
    if len(shard) != len(dataset):
        dataset = torch.utils.data.Subset(dataset, shard)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    batches = []
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc=desc, leave=False, disable=None if state.is_main_process else True):
            batches.append((compute(images.to(device)).cpu(), torch.as_tensor(targets)))
    return gather_batches(batches, state)


def token_grid(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of patch tokens a ViT makes of an image of ``size`` (height, width)."""
    patch = model.patch_embed.patch_size
    return size[0] // patch[0], size[1] // patch[1]


def patch_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The patch tokens after the model's final norm as a map, ``[B, D, rows, cols]``.

    What a user takes for a dense task: ``forward_features`` (last block, final norm) without the prefix
    tokens (class, registers), laid out on the patch grid.
    """
    tokens = model.forward_features(images)[:, getattr(model, "num_prefix_tokens", 0):]  # [B, rows * cols, D]
    rows, cols = token_grid(model, images.shape[-2:])
    if tokens.shape[1] != rows * cols:
        raise UserError(f"the model returned {tokens.shape[1]} patch tokens for a {rows}x{cols} grid; the dense probe "
                        f"needs a plain ViT token layout")
    return tokens.transpose(1, 2).reshape(len(tokens), -1, rows, cols)


def dataset_fingerprint(dataset: torch.utils.data.Dataset, *, data: str, split: str) -> dict:
    """What identifies the images and their preprocessing: spec, split, size, ids, labels, transform."""
    path = Path(data).expanduser()
    ids, targets = getattr(dataset, "sample_ids", None), getattr(dataset, "targets", None)
    if ids is None or targets is None:
        # Without them two different subsets of one spec would share a cache entry.
        raise TypeError(f"caching needs a dataset with sample_ids and targets (as open_dataset returns), "
                        f"not a {type(dataset).__name__}; cache the full split and index its features")
    listing = hashlib.blake2b(json.dumps([ids, targets], default=str).encode(), digest_size=16).hexdigest()
    return {
        "data": str(path.resolve()) if path.exists() else data,
        "split": split,
        "n": len(dataset),
        "samples": listing,
        "transform": repr(getattr(dataset, "transform", None)),
    }


@dataclass
class Features:
    """Pooled features of one dataset split, and whether they came from the cache."""
    features: torch.Tensor  # [N, D] float32
    labels: torch.Tensor  # [N] int64, or [N, C] float32 multi-hot
    from_cache: bool


def cached_features(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    data: str,
    split: str,
    pooling: str = "cls",
    cache_dir: str | os.PathLike | None = None,
    fingerprint: str | None = None,
    **extract_options,
) -> Features:
    """Features of ``dataset`` read from the cache, or extracted and then stored there.

    Args:
        model: the frozen backbone (its weights are hashed into the key).
        dataset: the split, with its transform set.
        data: the dataset spec it was opened from (part of the key).
        split: ``train`` or ``test`` (part of the key).
        pooling: one of :data:`POOLINGS` (part of the key).
        cache_dir: see :func:`resolve_cache_dir`.
        fingerprint: :func:`model_fingerprint` of ``model`` when the caller has it (hashing a large
            model takes a while, and a probe reads two splits).
        **extract_options: ``batch_size``, ``device``, ``num_workers`` for :func:`extract_features`.

    Returns:
        The :class:`Features`.
    """
    key_parts = {"model": fingerprint or model_fingerprint(model), "pooling": pooling,
                 **dataset_fingerprint(dataset, data=data, split=split)}
    path = _entry_path(key_parts, cache_dir)
    tensors = _read_entry(path, f"{split} features")
    if tensors is not None:
        return Features(tensors["features"], tensors["labels"], from_cache=True)
    features, labels = extract_features(model, dataset, pooling=pooling, desc=f"{split} features", **extract_options)
    _write_entry(path, {"features": features, "labels": labels}, key_parts)
    return Features(features, labels, from_cache=False)


def _entry_path(key_parts: dict, cache_dir) -> Path:
    key = hashlib.blake2b(json.dumps(key_parts, sort_keys=True).encode(), digest_size=16).hexdigest()
    return resolve_cache_dir(cache_dir) / f"{key}.safetensors"


def _read_entry(path: Path, what: str) -> dict | None:
    """A cache entry's tensors, if every process can read it (a node-local cache may hold it on some nodes
    only; then all extract)."""
    from safetensors.torch import load_file

    if not all_agree(path.is_file()):
        return None
    _logger.info("reusing cached %s %s", what, path)
    return load_file(str(path))


def _write_entry(path: Path, tensors: dict, key_parts: dict) -> None:
    """Store an entry from the first process (every process holds the gathered tensors; one writes them).

    Written then renamed, so that a killed run never leaves a truncated entry that a later run would trust.
    """
    from safetensors.torch import save

    if not process_state().is_main_process:
        return
    metadata = {k: str(v) for k, v in key_parts.items()}
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    _logger.info("cached %s in %s", ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()), path)


@dataclass
class Tokens:
    """Patch-token maps of one segmentation split and their masks (at the model's input size)."""
    tokens: torch.Tensor  # [N, D, rows, cols] float16
    masks: torch.Tensor  # [N, H, W] uint8 class indices, 255 ignored
    from_cache: bool

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size()


def cached_tokens(
    model: nn.Module,
    dataset,
    *,
    data: str,
    split: str,
    cache_dir: str | os.PathLike | None = None,
    fingerprint: str | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> Tokens:
    """Every image's patch tokens (:func:`patch_tokens`, stored as fp16) and mask, from the cache or extracted.

    Memory and disk: ``N x D x rows x cols x 2`` bytes (ViT-B/16 at 224 px: 0.3 MB an image).

    Args:
        model: the frozen backbone (its weights are hashed into the key).
        dataset: a :class:`~wecolora.data.segmentation.SegmentationDataset` with its joint transform set.
        data, split, cache_dir, fingerprint: as in :func:`cached_features`.
        batch_size, device, num_workers: of the extraction.
    """
    if len(dataset) == 0:
        raise UserError(f"cannot extract {split} tokens: the dataset holds no images")
    key_parts = {"model": fingerprint or model_fingerprint(model), "kind": "patch-tokens", "data": data, "split": split,
                 "n": len(dataset), "pairs": dataset.content_key(), "transform": repr(dataset.transform)}
    path = _entry_path(key_parts, cache_dir)
    tensors = _read_entry(path, f"{split} tokens")
    if tensors is not None:
        return Tokens(tensors["tokens"], tensors["masks"], from_cache=True)
    batches = _run_batches(model, dataset, lambda images: patch_tokens(model, images).half(), batch_size=batch_size,
                           device=device, num_workers=num_workers, desc=f"{split} tokens")
    tokens = torch.cat([t for t, _ in batches])
    masks = torch.cat([m for _, m in batches]).to(torch.uint8)
    _write_entry(path, {"tokens": tokens, "masks": masks}, key_parts)
    return Tokens(tokens, masks, from_cache=False)
