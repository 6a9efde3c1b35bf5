"""Image files as wecolora reads them: 8-bit RGB from any mode, the errors PIL raises for a damaged file, and a
split folder read as class folders (:class:`ImageFolderSplit`). Shared by :mod:`wecolora.data.datasets` (which
re-exports these names) and :mod:`wecolora.data.sources`, so that neither imports the other back.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder

from wecolora.data.layout import IMAGE_EXTENSIONS, is_image_name
from wecolora.errors import UserError


def class_folder_split(root: Path, folder: Path, split: str, *, transform=None,
                       classes: list[str] | None = None) -> ImageFolderSplit:
    """A split folder read as class folders; a test split takes the train split's class indices."""
    if classes is None and split == "test" and (root / "train").is_dir():
        classes = _class_folders(root / "train")
    if classes is not None:
        # Label i must mean the same class in both splits, even when a class is missing from the test split.
        unknown = sorted(set(_class_folders(folder)) - set(classes))
        if unknown:
            raise UserError(f"class folders {unknown} in {folder} have no counterpart in the training classes; add or "
                            f"remove them")
    return ImageFolderSplit(folder, root, transform=transform, classes=classes)


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
