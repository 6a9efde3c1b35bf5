"""The few-shot subset: per-class draws (floor(n_c x ratio), seeded), the saved ``subset.txt``, skipping
unreadable images (remembered per path, size and mtime), the images that choose kept blocks, and the digest
of a subset's images that names its caches."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from wecolora.data.datasets import to_rgb
from wecolora.errors import UserError
from wecolora.files import atomic_write_text, cache_folder

_logger = logging.getLogger(__name__)


def fingerprint_data(dataset, indices: list[int]) -> str:
    """A digest of the subset's images: pixels for in-memory sets, (path, size, mtime) for image folders."""
    digest = hashlib.blake2b(digest_size=16)
    ids = getattr(dataset, "sample_ids", None)
    digest.update("\n".join(ids[i] if ids else str(i) for i in indices).encode())
    if isinstance(getattr(dataset, "images", None), np.ndarray):  # data.ArrayDataset
        digest.update(np.ascontiguousarray(dataset.images[np.asarray(indices, dtype=np.int64)]).data)
    elif getattr(dataset, "samples", None) is not None:  # ImageFolder
        for i in indices:
            path = dataset.samples[i][0]
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def few_shot_indices(
    targets: list[int],
    *,
    ratio: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
    min_per_class: int = 1,
    classes: list[str] | None = None,
) -> list[int]:
    """The few-shot subset: per class, a seeded shuffle of its images, of which the first k are kept.

    k is ``floor(n_c * ratio)`` or ``min(per_class, n_c)``. Each class draws from its own generator
    seeded with ``(seed, class)``, so the choice ignores the global RNG and does not change when
    other classes are added or removed.

    Args:
        targets: the label of every image.
        ratio: fraction of each class to keep, in (0, 1]. Exactly one of ``ratio`` / ``per_class``.
        per_class: number of images to keep per class (capped at the class size), at least 1.
        seed: subset seed (non-negative).
        min_per_class: fewest images any class may end up with.
        classes: class names, so that an error names the class rather than its label.

    Returns:
        The kept indices into ``targets``, sorted.

    Example:
        >>> few_shot_indices([0] * 10 + [1] * 20, ratio=0.1)  # 1 of class 0, 2 of class 1
        [4, 10, 20]
    """
    if (ratio is None) == (per_class is None):
        raise UserError("give exactly one of ratio (fraction per class) or per_class (images per class)")
    if ratio is not None and not 0 < ratio <= 1:
        raise UserError(f"ratio {ratio} is outside (0, 1]; use e.g. 0.01 for 1% of each class")
    if per_class is not None and per_class < 1:
        raise UserError(f"per_class {per_class} must be at least 1")
    if seed < 0:
        raise UserError(f"subset seed {seed} must be non-negative")
    labels = np.asarray(targets, dtype=np.int64)
    if labels.size == 0:
        raise UserError("the dataset holds no images, so no few-shot subset can be drawn")
    kept, short = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        # The epsilon stops float error from dropping an image: 100 * 0.29 is 28.999999999999996.
        k = math.floor(len(idx) * ratio + 1e-9) if ratio is not None else min(per_class, len(idx))
        if k < min_per_class:
            short.append((int(c), len(idx), k))
        kept.append(np.random.default_rng((seed, int(c))).permutation(idx)[:k])
    if short:
        detail = ", ".join(f"class {classes[c] if classes else c} ({n} images -> {k})" for c, n, k in short)
        fix = f"use a ratio of at least {min_per_class / min(n for _, n, _ in short):.3g}" if ratio else "add images"
        raise UserError(
            f"the few-shot subset keeps fewer than {min_per_class} image(s) in {detail}; "
            f"{fix} or lower --min-per-class"
        )
    return sorted(int(i) for i in np.concatenate(kept))


def write_subset(path, dataset, indices) -> None:
    """Write the chosen images' ``sample_ids``, one a line (a run's ``subset.txt``), atomically."""
    atomic_write_text(path, "".join(dataset.sample_ids[i] + "\n" for i in indices))


def _decodes(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            to_rgb(Image.open(f))  # convert() forces a full decode: truncated files fail here
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return False


def _readable_files(paths: list[str], workers: int) -> list[bool]:
    """Whether each file decodes. The answer for a file listing is remembered under the cache folder, keyed by
    every file's (path, size, mtime): a second probe or run on an unchanged folder decodes nothing here."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    record = cache_folder("readable") / f"{digest.hexdigest()}.json"
    with contextlib.suppress(OSError, ValueError):
        unreadable = set(json.loads(record.read_text()))
        return [path not in unreadable for path in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        readable = list(pool.map(_decodes, paths))
    with contextlib.suppress(OSError):  # a read-only cache costs the next run a decode, not this one
        atomic_write_text(record, json.dumps([path for path, ok in zip(paths, readable) if not ok]))
    return readable


def drop_unreadable(dataset, indices: list[int], *, max_fraction: float = 0.05, min_per_class: int = 0,
                    workers: int = 8) -> tuple[list[int], list[str]]:
    """The chosen images whose files decode, and the ``sample_ids`` of those skipped (with a warning).

    Images held in memory (the built-ins) are all readable. More than ``max_fraction`` of the choice
    unreadable, or a class left with fewer than ``min_per_class`` images, stops with a UserError:
    a damaged copy of a dataset is better repaired than silently shrunk. Each file is decoded once per
    (path, size, mtime): the verdicts are remembered under ``$WECOLORA_CACHE_DIR/readable``.

    Returns:
        ``(kept indices, skipped sample ids)``.
    """
    samples = getattr(dataset, "samples", None)
    if samples is None or not indices:
        return list(indices), []
    readable = _readable_files([samples[i][0] for i in indices], workers)
    kept = [i for i, ok in zip(indices, readable) if ok]
    skipped = [dataset.sample_ids[i] for i, ok in zip(indices, readable) if not ok]
    if not skipped:
        return kept, skipped
    shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    if len(skipped) > max_fraction * len(indices):
        raise UserError(f"{len(skipped)} of the {len(indices)} chosen images cannot be read ({shown}): more than "
                        f"{max_fraction:.0%}; repair or remove the damaged files, or raise --max-unreadable")
    counts = np.bincount(np.asarray([dataset.targets[i] for i in kept], dtype=np.int64), minlength=len(dataset.classes))
    short = [dataset.classes[c] for c in np.unique([dataset.targets[i] for i in indices]) if counts[c] < min_per_class]
    if short:
        raise UserError(f"without its unreadable images ({shown}), class(es) {', '.join(short)} keep fewer than "
                        f"{min_per_class} image(s); repair the files, raise --ratio or lower --min-per-class")
    _logger.warning("skipping %d unreadable image(s) of %d: %s", len(skipped), len(indices), shown)
    return kept, skipped


def subset_images(dataset, indices: list[int], transform, *, count: int, seed: int) -> torch.Tensor:
    """Up to ``count`` images of the few-shot subset (a seeded draw), preprocessed: ``[N, C, H, W]``."""
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [indices[i] for i in order[:count]]
    return torch.stack([transform(dataset[i][0]) for i in chosen])
