"""What ``--data`` names, found with the standard library alone, so that ``wecolora distill --data /wrong/path``
fails before torch is imported.

A data spec is one of:

- a built-in name (:data:`BUILTIN_DATASET_NAMES`);
- a folder: class folders (``D/train/<class>/*``, ``D/val/`` or ``D/test/`` for evaluation) or an unlabeled
  folder (images at any depth, folder names meaningless); :func:`resolve_folder_layout` decides which and says so;
- a file list: ``.txt`` (one path per line) or ``.csv`` (a path column, optional label column(s));
- a Hugging Face ``datasets`` folder (``save_to_disk``), or parquet / arrow files (a file or a folder of them);
- WebDataset tar shards: a ``.tar`` file, a brace pattern (``shards-{000..127}.tar``) or a folder of ``.tar`` files.

The kind is found from what the path holds (:func:`parse_source`); a prefix (``hf-datasets:``, ``wds:``,
``list:``, ``folder:``) forces it.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from wecolora.errors import UserError

_logger = logging.getLogger(__name__)

BUILTIN_DATASET_NAMES = ("fashion-mnist", "mnist-5k")  # keys of data.BUILTIN_DATASETS (data imports torch)
# Built-in segmentation sets (data.segmentation): name -> (item source, canvases per split, canvas side, seed).
BUILTIN_SEGMENTATION = {
    "fashion-mnist-seg": ("fashion-mnist", {"train": 1000, "test": 500}, 56, 0),
    "mnist-5k-seg": ("mnist-5k", {"train": 1000, "test": 500}, 56, 0),
}
IGNORE_INDEX = 255  # mask value of pixels that count in no loss and no score


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SOURCE_KINDS = ("builtin", "folder", "list", "hf-datasets", "wds")
PREFIXES = ("hf-datasets", "wds", "list", "folder")  # "KIND:PATH" forces the kind
TABLE_SUFFIXES = (".parquet", ".arrow")
LIST_SUFFIXES = (".txt", ".csv")
SHARD_SUFFIX = ".tar"
COMPRESSED_SHARDS = (".tar.gz", ".tgz", ".tar.zst", ".tar.xz", ".tar.bz2")
# Column names taken without being asked (compared lower-case, without spaces, dashes and underscores).
PATH_COLUMN_NAMES = ("path", "image", "imagepath", "file", "filename", "filepath", "img", "imageindex")
LABEL_COLUMN_NAMES = ("label", "labels", "class", "target")
EXTRAS = {"hf-datasets": "datasets", "wds": "webdataset"}  # the pip extra each kind needs
NEEDS_LABELS = "this command (probe, knn, pretrain --objective supervised)"


def is_image_name(name: str) -> bool:
    """Whether a file name is an image we read (hidden files such as macOS ``._x.png`` excluded)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _has_image(folder: str) -> bool:
    """Whether ``folder`` holds an image file at any depth (what torchvision's ImageFolder would find)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(is_image_name(name) for name in files):
            return True
    return False


def missing_extra(kind: str, module: str) -> UserError:
    """The error for a source whose reader is an optional extra that is not installed."""
    return UserError(f"reading {kind} sources needs the {module} package: pip install 'wecolora[{EXTRAS[kind]}]'")


# ---------------------------------------------------------------------------------------------
# Which kind of source


@dataclass(frozen=True)
class Source:
    """A parsed data spec: its ``kind`` (one of :data:`SOURCE_KINDS`), ``path`` (the prefix removed; a pattern
    for shards, the name for built-ins) and the ``spec`` as given."""
    kind: str
    path: str
    spec: str

    def record(self) -> dict:
        """What a run's manifest says of its source."""
        path = Path(self.path).expanduser()
        return {"kind": self.kind, "spec": self.spec,
                "path": str(path.resolve()) if self.kind != "builtin" and path.exists() else self.path}


def is_pattern(path: str) -> bool:
    """Whether ``path`` is a brace pattern (``shards-{000..127}.tar``, ``{a,b}.tar``)."""
    return re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", path) is not None


def parse_source(spec: str, option: str = "--data") -> Source:
    """The kind of source ``spec`` names: a prefix forces it, else it is found from what the path holds.

    >>> parse_source("mnist-5k").kind, parse_source("wds:/data/s-{000..009}.tar").path
    ('builtin', '/data/s-{000..009}.tar')
    """
    if not spec:
        raise UserError(f"{option} is empty; give a folder, a file list, a datasets folder, tar shards or a built-in "
                        f"name ({', '.join(BUILTIN_DATASET_NAMES)})")
    prefix, colon, rest = spec.partition(":")
    if colon and prefix in PREFIXES:
        if not rest:
            raise UserError(f"{option} {spec!r} names no path after {prefix}:")
        return Source(prefix, rest, spec)
    if spec in BUILTIN_DATASET_NAMES:
        return Source("builtin", spec, spec)
    path = Path(spec).expanduser()
    if is_pattern(spec) and not path.exists():
        return Source("wds", spec, spec)
    if not path.exists():
        raise UserError(f"{option} {spec!r} is neither an existing folder nor a built-in name (nor a file list, "
                        f"dataset or shards); built-ins: {', '.join(BUILTIN_DATASET_NAMES)}")
    name = path.name.lower()
    if path.is_file():
        if name.endswith(LIST_SUFFIXES):
            return Source("list", spec, spec)
        if name.endswith(TABLE_SUFFIXES):
            return Source("hf-datasets", spec, spec)
        if name.endswith((SHARD_SUFFIX, *COMPRESSED_SHARDS)):
            return Source("wds", spec, spec)
        raise UserError(f"{option} {spec!r} is a file wecolora does not read; give a .txt/.csv list, .parquet/.arrow "
                        f"files, .tar shards or a folder (or force a kind: {', '.join(p + ':' for p in PREFIXES)})")
    if is_saved_dataset(path):
        return Source("hf-datasets", spec, spec)
    if not _top_level_images(path):  # a folder of tables or of shards, not of images
        if _files_with(path, TABLE_SUFFIXES, depth=2):
            return Source("hf-datasets", spec, spec)
        if _files_with(path, (SHARD_SUFFIX,), depth=1):
            return Source("wds", spec, spec)
    return Source("folder", spec, spec)


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                      and (path / "dataset_info.json").is_file())


def _top_level_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_file() and is_image_name(e.name) for e in entries)


def _files_with(folder: Path, suffixes: tuple[str, ...], depth: int) -> list[Path]:
    """Files under ``folder`` (at most ``depth`` levels down) whose names end with ``suffixes``, sorted."""
    found, level = [], [folder]
    for _ in range(depth):
        below = []
        for current in level:
            try:
                with os.scandir(current) as entries:
                    for e in entries:
                        if e.name.startswith("."):
                            continue
                        if e.is_file() and e.name.lower().endswith(suffixes):
                            found.append(Path(e.path))
                        elif e.is_dir():
                            below.append(Path(e.path))
            except OSError:
                continue
        level = below
    return sorted(found)


def shard_paths(pattern: str, option: str = "--data") -> list[Path]:
    """The tar shards a pattern, a ``.tar`` file or a folder of them names, in order; each must exist."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        shards = _files_with(path, (SHARD_SUFFIX, *COMPRESSED_SHARDS), depth=1)
        if not shards:
            raise UserError(f"{option} {pattern}: the folder holds no .tar shards")
    elif is_pattern(pattern) and not path.exists():
        try:
            from braceexpand import braceexpand
        except ImportError:
            raise missing_extra("wds", "braceexpand") from None
        shards = [Path(p).expanduser() for p in braceexpand(pattern)]
    else:
        shards = [path]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more of the {len(shards)}" if len(missing) > 1 else ""
        raise UserError(f"{option} {pattern}: shard {missing[0]}{more} does not exist")
    compressed = [p for p in shards if p.name.lower().endswith(COMPRESSED_SHARDS)]
    if compressed:
        raise UserError(f"{option} {pattern}: {compressed[0].name} is compressed; wecolora reads shards by member "
                        f"offset, which needs plain .tar files (images inside are compressed already): "
                        f"decompress them, e.g. gunzip -k {compressed[0].name}")
    return shards


# ---------------------------------------------------------------------------------------------
# Folders: class folders or unlabeled


def split_folder(root: Path, split: str, option: str = "--data") -> Path | None:
    """The folder of a split: ``root/train`` and ``root/val`` (else ``root/test``) when ``root/train`` exists,
    else ``root`` itself as the train split; None for a test split that does not exist."""
    if not (root / "train").is_dir():
        return root if split == "train" else None
    if split == "train":
        return root / "train"
    return next((root / name for name in ("val", "test") if (root / name).is_dir()), None)


def require_split_folder(root: Path, split: str, option: str = "--data") -> Path:
    """:func:`split_folder`, refusing in one line a split the folder does not have (``option`` names it)."""
    folder = split_folder(root, split)
    if folder is None and not (root / "train").is_dir():
        raise UserError(f"{option} {root} has no train/ folder, so it is the train split only; put evaluation "
                        f"images in {root / 'val'}/<class>/ or {root / 'test'}/<class>/ and the training images "
                        f"in {root / 'train'}/<class>/, or give the test images with --test-data")
    if folder is None:
        raise UserError(f"{option} {root} has no test split: create {root / 'val'} or {root / 'test'}, or give "
                        f"the test images with --test-data")
    return folder


def resolve_folder_layout(folder: Path, requested: str = "auto", option: str = "--data") -> str:
    """How a split folder is read: ``classes`` (each sub-folder a class) or ``unlabeled`` (images at any depth).

    ``auto``: images directly inside and no sub-folder holding images is unlabeled; sub-folders holding images
    and none directly inside are class folders; both at once is refused rather than guessed.
    """
    if requested in ("classes", "unlabeled"):
        return requested
    try:
        with os.scandir(folder) as entries:
            entries = list(entries)
    except OSError as err:
        raise UserError(f"{option}: cannot read {folder}: {err.strerror}") from None
    top = sum(1 for e in entries if e.is_file() and is_image_name(e.name))
    subfolders = [e.path for e in entries if e.is_dir() and not e.name.startswith(".")]
    if top and any(_has_image(sub) for sub in subfolders):
        raise UserError(f"{folder} holds images directly inside and in sub-folders: pass --folder-layout unlabeled "
                        f"(every image, folder names ignored) or --folder-layout classes (sub-folders are classes, "
                        f"the {top} top-level image(s) ignored)")
    return "unlabeled" if top or not subfolders else "classes"


def _check_class_folders(folder: Path, option: str) -> None:
    try:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        raise UserError(f"{option}: cannot read {folder}: {err.strerror}") from None
    if not classes:
        raise UserError(f"no class folders in {folder}; expected {folder}/<class>/*.png (or --folder-layout "
                        f"unlabeled for images without classes)")
    if classes == ["images", "masks"]:
        raise UserError(f"{option} {folder.parent if folder.name in ('train', 'val', 'test') else folder} holds "
                        f"images/ and masks/ folders, a segmentation set: probe it with wecolora probe --task "
                        f"segmentation")
    empty = [c for c in classes if not _has_image(str(folder / c))]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise UserError(f"class folder(s) {shown} in {folder} hold no images; "
                        f"add {'/'.join(IMAGE_EXTENSIONS)} files or remove the folders")


# ---------------------------------------------------------------------------------------------
# File lists


def read_csv_header(path: Path, option: str = "--data") -> tuple[list[str], list[str] | None]:
    """A csv list's column names and its first data row (None when it has none)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            first = next(reader, None)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{option} {path}: cannot read it as a csv list ({err})") from None
    if not header:
        raise UserError(f"{option} {path} is empty; a csv list needs a header row with a path column")
    return [c.strip() for c in header], first


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def csv_columns(path: Path, image_column: str | None = None, label_column: str | None = None,
                option: str = "--data") -> tuple[str, list[str]]:
    """``(path column, label columns)`` of a csv list: the named ones, else found by name (path/image/file...,
    label/class...) or, for the path, as the one column whose first value is an image file name.

    Several label columns (``label_column="A,B,C"``) are 0/1 columns of a multi-label set.
    """
    header, first = read_csv_header(path, option)
    if image_column is not None:
        if image_column not in header:
            raise UserError(f"{option} {path} has no column {image_column!r} (--image-column); columns: "
                            f"{', '.join(header)}")
        path_column = image_column
    else:
        named = [c for c in header if _norm(c) in PATH_COLUMN_NAMES]
        by_value = [c for c, v in zip(header, first or []) if is_image_name(Path(v.strip()).name)]
        candidates = named or by_value
        if len(candidates) != 1:
            raise UserError(f"{option} {path} has {'no' if not candidates else 'more than one'} path column "
                            f"(columns: {', '.join(header)}); name the column of image paths with --image-column")
        path_column = candidates[0]
    if label_column is not None:
        labels = [c.strip() for c in label_column.split(",")] if label_column not in header else [label_column]
        unknown = [c for c in labels if c not in header]
        if unknown:
            raise UserError(f"{option} {path} has no column {unknown[0]!r} (--label-column); columns: "
                            f"{', '.join(header)}")
    else:
        labels = [c for c in header if _norm(c) in LABEL_COLUMN_NAMES and c != path_column][:1]
    return path_column, labels


LIST_PROBE = 5  # a list none of whose first entries exists is refused before anything else is read


def list_path(list_file: Path, entry: str) -> Path:
    """A listed image's path: absolute, or relative to the list's own folder."""
    path = Path(entry).expanduser()
    return path if path.is_absolute() else list_file.parent / path


def _check_listed(list_file: Path, entries: list[str], option: str) -> None:
    """Refuse a list whose first entries all name missing files (a wrong base folder); single missing files are
    counted and skipped later under --max-unreadable."""
    if entries and not any(list_path(list_file, e).is_file() for e in entries):
        raise UserError(f"{option} {list_file} names images that do not exist (first: {list_path(list_file, entries[0])}); "
                        f"paths are read as absolute or relative to the list's folder {list_file.parent}")


def _check_list(path: Path, spec_option: str, *, image_column, label_column, need_labels: bool) -> None:
    if not path.is_file():
        raise UserError(f"{spec_option} {path}: a file list must be a .txt or .csv file")
    if path.suffix.lower() == ".csv":
        path_column, labels = csv_columns(path, image_column, label_column, spec_option)
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.DictReader(f)
            first = [row[path_column].strip() for row, _ in zip(rows, range(LIST_PROBE)) if row.get(path_column)]
        if not first:
            raise UserError(f"{spec_option} {path} is empty: it names no image")
        _check_listed(path, first, spec_option)
        if need_labels and not labels:
            raise UserError(f"{spec_option} {path} has no label column; name it with --label-column ({NEEDS_LABELS} "
                            f"needs labels)")
        return
    first = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip() and not line.lstrip().startswith("#"):
                first.append(line.strip())
                if len(first) == LIST_PROBE:
                    break
    if not first:
        raise UserError(f"{spec_option} {path} is empty: it names no image")
    _check_listed(path, first, spec_option)
    if need_labels:
        raise UserError(f"{spec_option} {path} is a .txt list, which has no labels, and {NEEDS_LABELS} needs "
                        f"them (a .csv list with a label column)")


# ---------------------------------------------------------------------------------------------
# The check of a spec


def saved_splits(path: Path) -> list[str] | None:
    """The splits of a ``save_to_disk`` DatasetDict (None for a single Dataset)."""
    record = path / "dataset_dict.json"
    if not record.is_file():
        return None
    try:
        return list(json.loads(record.read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def has_test_split(source: Source, folder_layout_: str = "auto") -> bool | None:
    """Whether a source holds a test split of its own (None: only its reader can tell, e.g. parquet files)."""
    path = Path(source.path).expanduser()
    if source.kind == "builtin":
        return True
    if source.kind == "folder":
        return split_folder(path, "test") is not None
    if source.kind == "hf-datasets":
        if path.is_dir() and is_saved_dataset(path):
            splits = saved_splits(path)
            return splits is not None and any(s in splits for s in TEST_SPLIT_NAMES)
        return None  # parquet/arrow files: datasets finds splits in their names
    return False  # lists and shards are one split each


TEST_SPLIT_NAMES = ("test", "validation", "val", "valid")


def check_dataset(spec: str, splits: tuple[str, ...] = ("train",), option: str = "--data", *,
                  folder_layout: str = "auto", image_column: str | None = None, label_column: str | None = None,
                  test_data: str | None = None, need_labels: bool = False) -> Source:
    """What can be checked of a data spec without reading its images: the paths exist, a folder holds images (in
    class folders when read as classes), a list names a path column, the shards exist. ``need_labels``: probe and
    kNN refuse sources that have no labels. A ``test`` split comes from the source or from ``test_data``.

    Returns:
        The parsed :class:`Source`.
    """
    if spec in BUILTIN_SEGMENTATION:
        raise UserError(f"{option} {spec} is a segmentation set (image + mask pairs): probe it with "
                        f"wecolora probe --task segmentation")
    source = parse_source(spec, option)
    options = dict(folder_layout=folder_layout, image_column=image_column, label_column=label_column)
    path = Path(source.path).expanduser()
    if source.kind == "builtin":
        pass
    elif source.kind == "folder":
        if not path.is_dir():
            raise UserError(f"{option} {spec!r} is not a folder")
        for split in splits:
            if split == "test" and test_data is not None:
                continue
            folder = require_split_folder(path, split, option)
            layout = resolve_folder_layout(folder, folder_layout, option)
            if layout == "classes":
                _check_class_folders(folder, option)
            elif not _has_image(str(folder)):
                raise UserError(f"no class folders in {folder} and no images in it; expected {folder}/<class>/*.png "
                                f"or images ({'/'.join(IMAGE_EXTENSIONS)}) directly inside")
            elif need_labels:
                raise UserError(f"{option} {folder} is read as an unlabeled folder (images directly inside), and "
                                f"{NEEDS_LABELS} needs labels: use class folders ({folder}/<class>/*.png), a csv list "
                                f"with a label column, or --folder-layout classes")
    elif source.kind == "list":
        _check_list(path, option, image_column=image_column, label_column=label_column, need_labels=need_labels)
    elif source.kind == "hf-datasets":
        if not path.exists():
            raise UserError(f"{option} {spec!r}: {path} does not exist")
        if path.is_dir() and not is_saved_dataset(path) and not _files_with(path, TABLE_SUFFIXES, depth=2):
            raise UserError(f"{option} {spec!r}: {path} is neither a save_to_disk folder nor a folder of "
                            f".parquet/.arrow files")
    elif source.kind == "wds":
        shard_paths(source.path, option)
    if "test" in splits and test_data is None and has_test_split(source, folder_layout) is False:
        raise UserError(f"{option} {spec} has no test split of its own; give the test images with --test-data "
                        f"SPEC (a folder, list, dataset or shards labelled like the training ones)")
    if "test" in splits and test_data is not None:
        check_dataset(test_data, ("train",), "--test-data", need_labels=need_labels, **options)
    return source


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
    train = root / "train"
    return spec in BUILTIN_SEGMENTATION or ((train / "images").is_dir() and (train / "masks").is_dir())


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
