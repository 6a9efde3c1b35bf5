"""Frozen-backbone features for probing: pooling, batched extraction and an on-disk cache.

A cache entry is one safetensors file per (model weights, dataset, split, transform, pooling), so a
second probe or kNN of the same model on the same data reads the features instead of recomputing them.
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
    from tqdm.auto import tqdm

    if pooling not in POOLINGS:
        raise UserError(f"pooling {pooling!r} is invalid: expected one of {', '.join(POOLINGS)}")
    if len(dataset) == 0:
        raise UserError(f"cannot extract {desc}: the dataset holds no images")
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
            batches.append((pool_tokens(model, images.to(device), pooling).float().cpu(), torch.as_tensor(targets)))
    batches = gather_batches(batches, state)
    features, labels = [f for f, _ in batches], [t for _, t in batches]
    targets = torch.cat(labels)
    targets = targets.float() if targets.ndim == 2 else targets.long()
    return torch.cat(features), targets


class _Unlabeled(torch.utils.data.Dataset):
    """Images ``indices`` of ``dataset`` through ``transform``, with a dummy label (features only)."""

    def __init__(self, dataset, indices: list[int], transform):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, p: int):
        image, _ = self.dataset[self.indices[p]]
        return self.transform(image), 0


def candidate_features(model: nn.Module, dataset, indices: list[int], *, transform, device: str | torch.device = "cpu",
                       batch_size: int = 256, num_workers: int = 0) -> torch.Tensor:
    """The frozen ``model``'s CLS features (after its final norm) of images ``indices`` of ``dataset`` (opened
    without a transform) through ``transform``: what a coreset subset compares (:class:`wecolora.data.subset.SubsetChoice`).

    Returns:
        ``[len(indices), D]`` float32 on the CPU.
    """
    features, _ = extract_features(model, _Unlabeled(dataset, indices, transform), pooling="cls",
                                   batch_size=batch_size, device=device, num_workers=num_workers,
                                   desc="coreset features")
    return features


def dataset_fingerprint(dataset: torch.utils.data.Dataset, *, data: str, split: str) -> dict:
    """What identifies the images and their preprocessing: spec, split, size, ids, labels, transform."""
    path = Path(data).expanduser()
    ids, targets = getattr(dataset, "sample_ids", None), getattr(dataset, "targets", None)
    if ids is None or targets is None:
        # Without them two different subsets of one spec would share a cache entry.
        raise TypeError(f"caching needs a dataset with sample_ids and targets (as open_dataset returns), "
                        f"not a {type(dataset).__name__}; cache the full split and index its features")
    listing = hashlib.blake2b(json.dumps([ids, targets], default=str).encode(), digest_size=16).hexdigest()
    base = getattr(dataset, "dataset", dataset)  # a LabeledSubset's source
    source = getattr(base, "fingerprint", None) or getattr(base, "shard_ids", None)  # tables, tar shards
    return {
        "data": str(path.resolve()) if path.exists() else data,
        **({"source": hashlib.blake2b(json.dumps(source).encode(), digest_size=16).hexdigest()} if source else {}),
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
    from safetensors.torch import load_file, save

    key_parts = {"model": fingerprint or model_fingerprint(model), "pooling": pooling,
                 **dataset_fingerprint(dataset, data=data, split=split)}
    key = hashlib.blake2b(json.dumps(key_parts, sort_keys=True).encode(), digest_size=16).hexdigest()
    path = resolve_cache_dir(cache_dir) / f"{key}.safetensors"
    # Read only if every process can (a node-local cache may hold it on some nodes only); else all extract.
    if all_agree(path.is_file()):
        _logger.info("reusing cached %s features %s", split, path)
        tensors = load_file(str(path))
        return Features(tensors["features"], tensors["labels"], from_cache=True)
    features, labels = extract_features(model, dataset, pooling=pooling, desc=f"{split} features", **extract_options)
    if not process_state().is_main_process:  # every process holds the gathered features; one writes them
        return Features(features, labels, from_cache=False)
    # Written then renamed, so that a killed run never leaves a truncated entry that a later run would trust.
    metadata = {k: str(v) for k, v in key_parts.items()}
    atomic_write_bytes(path, save({"features": features.contiguous(), "labels": labels.contiguous()}, metadata=metadata))
    _logger.info("cached %s features (%d x %d) in %s", split, *features.shape, path)
    return Features(features, labels, from_cache=False)
