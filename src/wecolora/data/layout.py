"""Checks of a dataset given on the command line (a built-in name or a folder of class folders), with
the standard library alone, so that ``wecolora distill --data /wrong/path`` fails before torch is imported."""
from __future__ import annotations

import os
from pathlib import Path

from wecolora.errors import UserError

BUILTIN_DATASET_NAMES = ("fashion-mnist", "mnist-5k")  # keys of data.BUILTIN_DATASETS (data imports torch)
# Built-in segmentation sets (data.segmentation): name -> (item source, canvases per split, canvas side, seed).
BUILTIN_SEGMENTATION = {
    "fashion-mnist-seg": ("fashion-mnist", {"train": 1000, "test": 500}, 56, 0),
    "mnist-5k-seg": ("mnist-5k", {"train": 1000, "test": 500}, 56, 0),
}
IGNORE_INDEX = 255  # mask value of pixels that count in no loss and no score


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def is_image_name(name: str) -> bool:
    """Whether a file name is an image we read (hidden files such as macOS ``._x.png`` excluded)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _has_image(folder: str) -> bool:
    """Whether ``folder`` holds an image file at any depth (what torchvision's ImageFolder would find)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(is_image_name(name) for name in files):
            return True
    return False


def _split_folder(root: Path, split: str, option: str) -> Path:
    if not (root / "train").is_dir():
        if split == "train":
            return root
        raise UserError(f"{option} {root} has no train/ folder, so it is the train split only; put evaluation "
                        f"images in {root / 'val'}/<class>/ or {root / 'test'}/<class>/ and the training images "
                        f"in {root / 'train'}/<class>/")
    if split == "train":
        return root / "train"
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    raise UserError(f"{option} {root} has no test split: create {root / 'val'} or {root / 'test'}")


def check_dataset(spec: str, splits: tuple[str, ...] = ("train",), option: str = "--data") -> None:
    """A built-in name, or a folder whose splits hold class folders that each hold images."""
    if spec in BUILTIN_DATASET_NAMES:
        return
    if spec in BUILTIN_SEGMENTATION:
        raise UserError(f"{option} {spec} is a segmentation set (image + mask pairs): probe it with "
                        f"wecolora probe --task segmentation")
    root = Path(spec).expanduser()
    if not root.exists():
        raise UserError(f"{option} {spec!r} is neither an existing folder nor a built-in name; "
                        f"built-ins: {', '.join(BUILTIN_DATASET_NAMES)}")
    if not root.is_dir():
        raise UserError(f"{option} {spec!r} is a file; give a folder of class folders or a built-in name")
    for split in splits:
        folder = _split_folder(root, split, option)
        try:
            classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        except OSError as err:
            raise UserError(f"{option}: cannot read {folder}: {err.strerror}") from None
        if not classes:
            raise UserError(f"no class folders in {folder}; expected {folder}/<class>/*.png")
        if classes == ["images", "masks"]:
            raise UserError(f"{option} {spec} holds images/ and masks/ folders, a segmentation set: probe it with "
                            f"wecolora probe --task segmentation")
        empty = [c for c in classes if not _has_image(str(folder / c))]
        if empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise UserError(f"class folder(s) {shown} in {folder} hold no images; "
                            f"add {'/'.join(IMAGE_EXTENSIONS)} files or remove the folders")


def segmentation_split_folder(root: Path, split: str, option: str = "--data") -> Path:
    """The folder of a segmentation split (``root/train``, ``root/val`` else ``root/test``), with its
    ``images/`` and ``masks/`` folders checked."""
    if not root.is_dir():
        raise UserError(f"{option} {root} is neither a folder nor a built-in segmentation set; built-ins: "
                        f"{', '.join(BUILTIN_SEGMENTATION)}")
    names = ("train",) if split == "train" else ("val", "test")
    folder = next((root / name for name in names if (root / name).is_dir()), None)
    if folder is None:
        raise UserError(f"{option} {root} has no {' or '.join(f'{n}/' for n in names)} folder; a segmentation set "
                        f"holds train/images/*.png with train/masks/*.png, and the same under val/ or test/")
    for part in ("images", "masks"):
        if not (folder / part).is_dir():
            raise UserError(f"{option}: {folder} has no {part}/ folder; expected {folder}/images/NAME.png|jpg with "
                            f"{folder}/masks/NAME.png (class indices, 255 = ignore)")
    return folder


def is_segmentation_set(spec: str) -> bool:
    """Whether ``spec`` names image + mask pairs: a built-in segmentation set, or a folder whose ``train/``
    holds ``images/`` and ``masks/``."""
    root = Path(spec).expanduser()
    return spec in BUILTIN_SEGMENTATION or ((root / "train" / "images").is_dir() and (root / "train" / "masks").is_dir())


def check_segmentation_dataset(spec: str, splits: tuple[str, ...] = ("train", "test"), option: str = "--data") -> None:
    """A built-in segmentation set, or a folder whose splits hold ``images/`` and ``masks/`` with images."""
    if spec in BUILTIN_SEGMENTATION:
        return
    if spec in BUILTIN_DATASET_NAMES:
        raise UserError(f"{option} {spec} is a classification set (one label an image); for --task segmentation give "
                        f"{' or '.join(BUILTIN_SEGMENTATION)} or a folder of image + mask pairs")
    root = Path(spec).expanduser()
    if not root.exists():
        raise UserError(f"{option} {spec!r} is neither an existing folder nor a built-in segmentation set; built-ins: "
                        f"{', '.join(BUILTIN_SEGMENTATION)}")
    for split in splits:
        folder = segmentation_split_folder(root, split, option)
        if not any(is_image_name(e.name) for e in os.scandir(folder / "images")):
            raise UserError(f"{option}: {folder / 'images'} holds no {'/'.join(IMAGE_EXTENSIONS)} image")
