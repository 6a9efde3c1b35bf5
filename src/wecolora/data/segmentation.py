"""Segmentation data: image + mask pairs for the dense probe, from a folder or built offline from real images.

A folder holds ``D/train/images/*.png|jpg`` and ``D/train/masks/*.png`` (one channel of class indices,
255 = ignore), paired by file stem, and the same under ``D/val/`` or ``D/test/``; ``D/classes.txt`` (one
name per line, line i = class i) declares the classes, else they are ``0..max`` of the training masks.
A pair that cannot be used (no mask, a mask of another size than its image, a file that does not decode)
is skipped and counted, and more than ``--max-unreadable`` of a split stops the run; a class index
beyond the declared classes stops it with the file named.

The built-in sets (:data:`BUILTIN_SEGMENTATION`) are made from real images, offline: each canvas holds a
few Fashion-MNIST (or MNIST) items at their own 28 px scale, placed at seeded random positions without
overlapping, and each pixel is labelled with its item's class (1..10) where the item's pixel is at least
:data:`ITEM_THRESHOLD`, else background (0). At the 56 px canvas a patch-7 model sees 8 x 8 tokens, an
item about 4 x 4 of them.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wecolora.data.layout import (
    BUILTIN_SEGMENTATION,
    IGNORE_INDEX,
    is_image_name,
    segmentation_split_folder,
)
from wecolora.errors import UserError

_logger = logging.getLogger(__name__)

ITEM_THRESHOLD = 32  # an item pixel at least this bright (0-255) is labelled with the item's class
ITEMS_PER_CANVAS = (2, 4)  # tried per canvas (inclusive); an item that finds no free place after some draws is left out
PLACEMENT_TRIES = 30


# ---------------------------------------------------------------- the built-in sets


def compose_canvases(images: np.ndarray, labels: np.ndarray, count: int, *, size: int, seed: int,
                     items: tuple[int, int] = ITEMS_PER_CANVAS,
                     threshold: int = ITEM_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Canvases of real items placed without overlap, and their masks; the same for the same arguments.

    Each item is cropped to the box of its pixels at least ``threshold`` bright and pasted at a random
    position whose box meets no earlier item's box (so the items' pixels never overlap); the first item
    of a canvas always fits.

    Args:
        images: ``[N, h, w]`` uint8 grey items on a black background.
        labels: ``[N]`` their classes (0-based); the mask says ``label + 1`` (0 is background).
        count: canvases to make.
        size: canvas side in pixels.
        seed: the one seed of the draws (item, count, position).
        items: fewest and most items tried per canvas.
        threshold: brightness from which an item pixel is labelled with its class.

    Returns:
        ``(canvases [count, size, size] uint8, masks [count, size, size] uint8)``.

    Example:
        >>> canvases, masks = compose_canvases(np.full((1, 4, 4), 200, np.uint8), np.array([2]), 1, size=8, seed=0)
        >>> int(masks.max()), int((masks == 3).sum())
        (3, 16)
    """
    rng = np.random.default_rng(seed)
    canvases = np.zeros((count, size, size), np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    for canvas, mask in zip(canvases, masks):
        boxes = []  # (top, left, bottom, right) of the items placed on this canvas
        for _ in range(rng.integers(items[0], items[1] + 1)):
            j = int(rng.integers(len(images)))
            bright = images[j] >= threshold
            if not bright.any():
                continue
            rows, cols = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
            crop = images[j][rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            h, w = crop.shape
            for _ in range(PLACEMENT_TRIES):
                top, left = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
                box = (top, left, top + h, left + w)
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                    canvas[top:top + h, left:left + w] = crop
                    mask[top:top + h, left:left + w][crop >= threshold] = labels[j] + 1
                    boxes.append(box)
                    break
    return canvases, masks


@functools.lru_cache(maxsize=4)
def builtin_pairs(name: str, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """A built-in set's canvases, masks and class names (background first); made once per process."""
    from wecolora.data.datasets import open_dataset

    source, counts, size, seed = BUILTIN_SEGMENTATION[name]
    items = open_dataset(source, split)
    canvases, masks = compose_canvases(items.images, np.asarray(items.targets), counts[split], size=size,
                                       seed=seed + (split == "test"))  # fmt: skip
    return canvases, masks, ("background", *items.classes)


# ---------------------------------------------------------------- the dataset


class SegmentationDataset(torch.utils.data.Dataset):
    """Image + mask pairs: ``(image, mask)`` through ``transform(image, mask)`` (PIL RGB, uint8 array without one).

    Attributes:
        classes: class names; mask values are their indices, :data:`IGNORE_INDEX` is ignored.
        sample_ids: one per pair (``"train/images/a.png"`` or ``"train/000123"``).
        skipped: ``sample_ids`` of the pairs left out, each with its reason.
    """

    def __init__(self, classes: list[str], sample_ids: list[str], *, arrays: tuple[np.ndarray, np.ndarray] | None = None,
                 files: list[tuple[Path, Path]] | None = None, transform=None, identity: str = ""):
        self.classes, self.sample_ids, self.arrays, self.files = list(classes), sample_ids, arrays, files
        self.transform, self.identity, self.skipped = transform, identity, []

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int):
        if self.arrays is not None:
            image, mask = Image.fromarray(self.arrays[0][i]).convert("RGB"), self.arrays[1][i]
        else:
            image, mask = read_pair(*self.files[i])
        return (image, mask) if self.transform is None else self.transform(image, mask)

    def subset(self, indices: list[int]) -> SegmentationDataset:
        """The pairs at ``indices`` (same classes, transform; its identity names the choice)."""
        arrays = None if self.arrays is None else (self.arrays[0][indices], self.arrays[1][indices])
        files = None if self.files is None else [self.files[i] for i in indices]
        part = SegmentationDataset(self.classes, [self.sample_ids[i] for i in indices], arrays=arrays, files=files,
                                   transform=self.transform, identity=self.identity)
        part.skipped = self.skipped
        return part

    def content_key(self) -> str:
        """What identifies the pairs for a cache key: the spec, the ids and, for files, their sizes and times."""
        digest = hashlib.blake2b(self.identity.encode(), digest_size=16)
        digest.update("\n".join(self.sample_ids).encode())
        for image, mask in self.files or ():
            for path in (image, mask):
                stat = os.stat(path)
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return digest.hexdigest()


def read_pair(image_path: Path, mask_path: Path) -> tuple[Image.Image, np.ndarray]:
    """An image as RGB and its mask as ``[H, W]`` uint8 class indices."""
    from wecolora.data.datasets import load_rgb

    return load_rgb(str(image_path)), read_mask(mask_path)


def read_mask(path: Path) -> np.ndarray:
    """A mask file as ``[H, W]`` uint8: grey (L) or palette (P) PNGs, whose values are the class indices."""
    with Image.open(path) as mask:
        if mask.mode not in ("L", "P"):
            raise UserError(f"mask {path} is a {mask.mode} image: masks must hold one channel of class indices "
                            f"(grey or palette PNG, 255 = ignore)")
        return np.asarray(mask, dtype=np.uint8).copy()


def open_segmentation(spec: str, split: str = "train", transform=None, *, classes: list[str] | None = None,
                      max_unreadable: float = 0.05) -> SegmentationDataset:
    """A split of a segmentation set: a built-in name or a folder (see the module docstring).

    Args:
        spec: ``fashion-mnist-seg``, ``mnist-5k-seg`` or a folder.
        split: ``train`` or ``test`` (a folder's ``val/``, else ``test/``).
        transform: ``transform(PIL image, uint8 mask) -> (image, mask)``; None returns them as read.
        classes: the train split's classes for a test split of a folder (default: its own declaration).
        max_unreadable: share of the split's pairs that may be skipped (counted in ``skipped``).

    Returns:
        The :class:`SegmentationDataset`.

    Example:
        >>> ds = open_segmentation("mnist-5k-seg", "test")
        >>> len(ds), ds.classes[:3]
        (500, ['background', '0', '1'])
    """
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; use train or test")
    if spec in BUILTIN_SEGMENTATION:
        canvases, masks, names = builtin_pairs(spec, split)
        return SegmentationDataset(list(names), [f"{split}/{i:06d}" for i in range(len(canvases))],
                                   arrays=(canvases, masks), transform=transform, identity=f"{spec}:{split}:v1")
    root = Path(spec).expanduser()
    folder = segmentation_split_folder(root, split)
    pairs, skipped = _pair_files(folder, root)
    total = len(pairs) + len(skipped)  # every image of the split; those without a mask are already skipped
    classes = classes or declared_classes(root, [mask for _, mask in pairs])
    kept = []
    for image, mask in pairs:
        problem = _check_pair(image, mask, len(classes), root)
        if problem is None:
            kept.append((image, mask))
        else:
            skipped.append(f"{image.relative_to(root).as_posix()} ({problem})")
    _check_skipped(skipped, total, max_unreadable, folder)
    if not kept:
        raise UserError(f"{folder} holds no usable image + mask pair; expected {folder}/images/NAME.png with "
                        f"{folder}/masks/NAME.png")
    dataset = SegmentationDataset(classes, [image.relative_to(root).as_posix() for image, _ in kept], files=kept,
                                  transform=transform, identity=f"{root.resolve()}:{split}")
    dataset.skipped = skipped
    return dataset


def _pair_files(folder: Path, root: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """``(image, mask)`` paths matched by stem, and the images without a mask (as skip records)."""
    images = sorted(p for p in (folder / "images").iterdir() if p.is_file() and is_image_name(p.name))
    masks = {p.stem: p for p in (folder / "masks").iterdir() if p.is_file() and is_image_name(p.name)}
    pairs, skipped = [], []
    for image in images:
        mask = masks.pop(image.stem, None)
        if mask is None:
            skipped.append(f"{image.relative_to(root).as_posix()} (no mask)")
        else:
            pairs.append((image, mask))
    if masks:
        _logger.info("%d mask(s) in %s have no image and are not used: %s", len(masks), folder / "masks",
                     ", ".join(sorted(masks)[:3]))
    return pairs, skipped


def declared_classes(root: Path, train_masks: list[Path]) -> list[str]:
    """``root/classes.txt`` (one name a line), else ``0..max`` of the training masks (255 aside)."""
    listing = root / "classes.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not names or len(names) > IGNORE_INDEX:
            raise UserError(f"{listing} must name between 1 and {IGNORE_INDEX} classes, one a line; it names {len(names)}")
        return names
    top = -1
    for path in train_masks:
        try:
            values = np.unique(read_mask(path))
        except UserError:
            raise
        except (OSError, SyntaxError, ValueError):
            continue  # an unreadable mask is skipped (and counted) with its pair
        values = values[values != IGNORE_INDEX]
        top = max(top, int(values.max()) if len(values) else -1)
    if top < 0:
        raise UserError(f"the training masks under {root} hold no class index (only 255, or none are readable); "
                        f"add masks or a {listing} naming the classes")
    return [str(c) for c in range(top + 1)]


def _check_pair(image: Path, mask: Path, num_classes: int, root: Path) -> str | None:
    """Why a pair cannot be used (None: it can); a class index beyond the classes stops the run."""
    try:
        with Image.open(image) as img:
            img.verify()
        with Image.open(image) as img:
            size = img.size
        values = read_mask(mask)
    except UserError:
        raise  # a mask that is not class indices is the set's mistake, not a damaged file
    except (OSError, SyntaxError, ValueError) as err:
        return f"does not decode: {type(err).__name__}"
    if values.shape != (size[1], size[0]):
        return f"mask {values.shape[1]}x{values.shape[0]} but image {size[0]}x{size[1]}"
    beyond = np.unique(values[(values >= num_classes) & (values != IGNORE_INDEX)])
    if len(beyond):
        raise UserError(f"mask {mask.relative_to(root).as_posix()} holds class index {int(beyond[0])} but the set declares "
                        f"{num_classes} classes (0..{num_classes - 1}, 255 ignored); fix the mask or list every class "
                        f"in {root / 'classes.txt'}")
    return None


def _check_skipped(skipped: list[str], total: int, max_fraction: float, folder: Path) -> None:
    if not skipped:
        return
    shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    if len(skipped) > max_fraction * total:
        raise UserError(f"{len(skipped)} of the {total} images in {folder} have no usable mask ({shown}): more than "
                        f"{max_fraction:.0%}; repair the pairs or raise --max-unreadable")
    _logger.warning("skipping %d of %d image(s) in %s: %s", len(skipped), total, folder, shown)

