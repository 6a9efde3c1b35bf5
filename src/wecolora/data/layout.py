"""Checks of a dataset given on the command line (a built-in name or a folder of class folders), with
the standard library alone, so that ``wecolora distill --data /wrong/path`` fails before torch is imported."""
from __future__ import annotations

import os
from pathlib import Path

from wecolora.errors import UserError

BUILTIN_DATASET_NAMES = ("fashion-mnist", "mnist-5k")  # keys of data.BUILTIN_DATASETS (data imports torch)


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
        empty = [c for c in classes if not _has_image(str(folder / c))]
        if empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise UserError(f"class folder(s) {shown} in {folder} hold no images; "
                            f"add {'/'.join(IMAGE_EXTENSIONS)} files or remove the folders")
