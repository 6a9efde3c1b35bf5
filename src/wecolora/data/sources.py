"""Image sources beyond class folders and the built-ins: unlabeled folders, file lists, Hugging Face ``datasets``
(``save_to_disk`` folders, parquet/arrow files) and WebDataset tar shards.

Every source opens as a dataset like the others (:func:`wecolora.data.datasets.open_dataset`): ``classes``
(``[]`` when unlabeled), ``targets`` (one int per image, ``-1`` when unlabeled; a 0/1 list per image when
``multilabel``), ``sample_ids`` (each image's key: a path, ``split/row`` or ``shard.tar/member``) and
``(image, label)`` items. Listing a source reads no pixels: a folder is walked, a list read, a table's label
column read, a tar shard's member headers read (and the index remembered per shard path, size and mtime).
Only the images chosen later are decoded, through :func:`item_reader`, which gives their encoded bytes.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wecolora.data.layout import (
    IMAGE_EXTENSIONS,
    TABLE_SUFFIXES,
    TEST_SPLIT_NAMES,
    Source,
    _files_with,
    csv_columns,
    is_image_name,
    is_saved_dataset,
    missing_extra,
    require_split_folder,
    resolve_folder_layout,
    shard_paths,
)
from wecolora.errors import UserError
from wecolora.files import atomic_write_bytes, cache_folder

_logger = logging.getLogger(__name__)

MULTI_LABEL_SEPARATOR = "|"  # ChestX-ray14's "Finding Labels": "Effusion|Mass"
SHARD_IMAGE_EXTENSIONS = tuple(e[1:] for e in IMAGE_EXTENSIONS)  # a tar member "key.png": extension "png"
INDEX_FORMAT = 1
OPEN_SHARDS = 64  # shard files a reader holds open at once


# ---------------------------------------------------------------------------------------------
# Labels


def read_labels(values: list, *, where: str, names: list[str] | None = None, classes: list[str] | None = None,
                multi_columns: list[str] | None = None) -> tuple[list, list[str], bool]:
    """Per-image labels as ``(targets, classes, multilabel)``.

    Args:
        values: one raw label per image: an int, a string (``"a|b"`` is multi-label), a list of labels
            (multi-label), or, with ``multi_columns``, the list of that image's 0/1 column values.
        where: names the source in errors.
        names: the label names of integer labels (a ``datasets`` ClassLabel).
        classes: the training split's classes, so that a test split's labels mean the same; a label outside
            them is refused.
        multi_columns: several 0/1 columns: each is a label of a multi-label set.

    Returns:
        Single-label: class indices and the sorted class names (numbers in numeric order). Multi-label: 0/1
        lists and the label names.
    """
    if multi_columns is not None:
        targets = []
        for row, value in enumerate(values):
            try:
                hot = [int(float(v)) for v in value]
            except (TypeError, ValueError):
                hot = None
            if hot is None or any(h not in (0, 1) for h in hot):
                raise UserError(f"{where}: row {row + 1} holds {value!r} in the label columns {multi_columns}; "
                                f"several label columns must hold 0 or 1")
            targets.append(hot)
        return targets, list(multi_columns), True
    multi = any(isinstance(v, (list, tuple)) for v in values) or any(
        isinstance(v, str) and MULTI_LABEL_SEPARATOR in v for v in values)
    if multi:
        sets = [_label_set(v, names) for v in values]
        known = classes if classes is not None else sorted(set().union(*sets), key=_label_order)
        unknown = sorted(set().union(*sets) - set(known), key=_label_order)
        if unknown:
            raise UserError(f"{where}: label(s) {unknown[:5]} do not occur in the training split; remove those "
                            f"images or add the labels there")
        index = {name: i for i, name in enumerate(known)}
        targets = []
        for labels in sets:
            hot = [0] * len(known)
            for name in labels:
                hot[index[name]] = 1
            targets.append(hot)
        return targets, list(known), True
    texts = []
    for row, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and np.isnan(value)):
            raise UserError(f"{where}: image {row + 1} has no label; give every image a label, or leave "
                            f"--label-column out to read the source unlabeled")
        texts.append(names[int(value)] if names is not None else str(value).strip())
    known = classes if classes is not None else (list(names) if names is not None
                                                 else sorted(set(texts), key=_label_order))
    unknown = sorted(set(texts) - set(known), key=_label_order)
    if unknown:
        raise UserError(f"{where}: label(s) {unknown[:5]} do not occur in the training split; remove those images "
                        f"or add the class there")
    index = {name: i for i, name in enumerate(known)}
    return [index[t] for t in texts], list(known), False


def _label_set(value, names) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple)):
        return {names[int(v)] if names is not None else str(v).strip() for v in value}
    return {part.strip() for part in str(value).split(MULTI_LABEL_SEPARATOR) if part.strip()}


def _label_order(name: str):
    """Numbers in numeric order (``"2"`` before ``"10"``), then names alphabetically."""
    try:
        return 0, float(name), ""
    except ValueError:
        return 1, 0.0, name


# ---------------------------------------------------------------------------------------------
# Reading chosen images


class FileReader:
    """The chosen images of a path-based source (a folder, a list): ``read(p)`` gives image ``p``'s bytes."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, p: int) -> str:
        return self.paths[p]

    def identity(self, p: int) -> str:
        """``path:size:mtime`` (what the caches are keyed on); a missing file is ``path:missing``."""
        try:
            stat = os.stat(self.paths[p])
        except OSError:
            return f"{self.paths[p]}:missing"
        return f"{self.paths[p]}:{stat.st_size}:{stat.st_mtime_ns}"

    def read(self, p: int) -> bytes:
        with open(self.paths[p], "rb") as f:
            return f.read()

    def open(self, p: int):
        """A file object PIL can read the header from without reading the whole image."""
        return open(self.paths[p], "rb")


class EncodedReader:
    """The chosen images of a source that holds them encoded (table rows, tar members): their names and
    identities, and ``read(p)`` through the small picklable ``fetch`` the source gives (a loader worker receives
    this reader, not the whole listing)."""

    def __init__(self, names: list[str], identities: list[str], fetch):
        self.names, self.identities, self.fetch = names, identities, fetch

    def __len__(self) -> int:
        return len(self.names)

    def name(self, p: int) -> str:
        return self.names[p]

    def identity(self, p: int) -> str:
        return self.identities[p]

    def read(self, p: int) -> bytes:
        return self.fetch(p)

    def open(self, p: int):
        return io.BytesIO(self.read(p))


def item_reader(dataset, indices: list[int]):
    """A reader of the chosen images' encoded bytes (:class:`FileReader` or :class:`EncodedReader`); None for
    images held in memory (the built-ins)."""
    if hasattr(dataset, "reader"):
        return dataset.reader([int(i) for i in indices])
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return FileReader([samples[i][0] for i in indices])
    return None


# ---------------------------------------------------------------------------------------------
# The datasets


class SourceDataset(torch.utils.data.Dataset):
    """What every source shares: ``classes``, ``targets``, ``multilabel``, ``sample_ids``, ``transform`` and items
    ``(image, label)`` (a float 0/1 tensor for multi-label sets, -1 when unlabeled)."""

    source: Source
    where: str

    def __init__(self, sample_ids: list[str], targets: list | None, classes: list[str], *, multilabel: bool = False,
                 transform=None):
        self.sample_ids = sample_ids
        self.targets = targets if targets is not None else [-1] * len(sample_ids)
        self.classes, self.multilabel, self.transform = list(classes), multilabel, transform

    def __len__(self) -> int:
        return len(self.sample_ids)

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, i: int):
        img = self.load(i)
        target = self.targets[i]
        if self.multilabel:
            target = torch.tensor(target, dtype=torch.float32)
        return (img if self.transform is None else self.transform(img)), target

    def describe(self) -> str:
        """One line for the log: what was read, and how many images and labels."""
        labels = (f"{len(self.classes)} labels (multi-label)" if self.multilabel
                  else f"{len(self.classes)} classes" if self.classes else "unlabeled")
        return f"{self.where}: {len(self)} images, {labels}"


class _Paths:
    """``samples``-like view, ``(path, target)`` per image, computed on access (no second list of paths)."""

    def __init__(self, base: str, ids: list[str], targets: list):
        self.base, self.ids, self.targets = base, ids, targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return os.path.join(self.base, os.path.expanduser(self.ids[i])), self.targets[i]


class FileListDataset(SourceDataset):
    """Images named by paths: an unlabeled folder (``sample_ids`` relative to it) or a list (as listed, read
    relative to the list's folder)."""

    def __init__(self, base: Path, ids: list[str], targets, classes, *, source: Source, where: str,
                 multilabel: bool = False, transform=None):
        super().__init__(ids, targets, classes, multilabel=multilabel, transform=transform)
        self.source, self.where, self.base = source, where, base
        self.samples = _Paths(str(base), ids, self.targets)

    def load(self, i: int) -> Image.Image:
        from wecolora.data.images import load_rgb

        return load_rgb(self.samples[i][0])


class EncodedDataset(SourceDataset):
    """Images held encoded in a container; subclasses give ``fetcher(indices)`` (a picklable callable: position
    -> bytes) and ``identity(i)``."""

    def read_bytes(self, i: int) -> bytes:
        return self.fetcher([i])(0)

    def reader(self, indices: list[int]) -> EncodedReader:
        return EncodedReader([f"{self.where}: {self.sample_ids[i]}" for i in indices],
                             [self.identity(i) for i in indices], self.fetcher(indices))

    def load(self, i: int) -> Image.Image:
        from wecolora.data.images import PIL_ERRORS, no_longer_readable, to_rgb

        try:
            return to_rgb(Image.open(io.BytesIO(self.read_bytes(i))))
        except PIL_ERRORS as err:
            raise no_longer_readable(f"{self.where}: {self.sample_ids[i]}", err) from None


# ---------------------------------------------------------------------------------------------
# Folders and lists


def walk_images(folder: Path) -> list[str]:
    """Every image under ``folder`` at any depth, as sorted paths relative to it (hidden folders skipped)."""
    found = []
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(current, folder)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found += [prefix + name for name in files if is_image_name(name)]
    return sorted(found)


def open_folder(source: Source, split: str, *, folder_layout: str = "auto", classes: list[str] | None = None,
                transform=None):
    """A folder's split: class folders (:class:`~wecolora.data.images.ImageFolderSplit`) or unlabeled images at
    any depth; which one is logged, and ``--folder-layout`` overrides it."""
    from wecolora.data.images import class_folder_split

    root = Path(source.path).expanduser()
    folder = require_split_folder(root, split, "dataset folder")
    layout = resolve_folder_layout(folder, folder_layout)
    if layout == "classes":
        dataset = class_folder_split(root, folder, split, transform=transform, classes=classes)
        if folder_layout == "auto":
            shown = ", ".join(dataset.classes[:5]) + (", ..." if len(dataset.classes) > 5 else "")
            _logger.info("%s: read as class folders, %d images in %d classes (%s); --folder-layout unlabeled reads "
                         "the images without labels", folder, len(dataset), len(dataset.classes), shown)
        return dataset
    prefix = "" if folder == root else os.path.relpath(folder, root).replace(os.sep, "/") + "/"
    ids = [prefix + rel for rel in walk_images(folder)]
    if not ids:
        raise UserError(f"no class folders in {folder} and no images in it; expected {folder}/<class>/*.png or "
                        f"images ({'/'.join(IMAGE_EXTENSIONS)}) directly inside")
    dataset = FileListDataset(root, ids, None, [], source=source, where=str(folder), transform=transform)
    if folder_layout == "auto":
        _logger.info("%s: read as an unlabeled folder (images directly inside), %d images at any depth; "
                     "--folder-layout classes reads sub-folders as classes", folder, len(ids))
    return dataset


def open_list(source: Source, *, image_column=None, label_column=None, classes=None, transform=None):
    """A ``.txt`` list (one path a line; ``#`` comments) or a ``.csv`` list (a path column, optional label
    column(s)); paths are absolute or relative to the list's folder."""
    path = Path(source.path).expanduser()
    where = str(path)
    targets, names, multilabel = None, [], False
    if path.suffix.lower() == ".csv":
        path_column, label_columns = csv_columns(path, image_column, label_column)
        ids, raw = [], []
        with open(path, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f, skipinitialspace=True):
                row = {(k or "").strip(): v for k, v in row.items()}
                entry = (row.get(path_column) or "").strip()
                if not entry:
                    continue
                ids.append(entry)
                if len(label_columns) > 1:
                    raw.append([row.get(c) for c in label_columns])
                elif label_columns:
                    raw.append(row.get(label_columns[0]))
        if label_columns and ids:
            targets, names, multilabel = read_labels(raw, where=where, classes=classes,
                                                     multi_columns=label_columns if len(label_columns) > 1 else None)
    else:
        with open(path, encoding="utf-8") as f:
            ids = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise UserError(f"{where} is empty: it names no image")
    base = path.parent
    dataset = FileListDataset(base, ids, targets, names, source=source, where=where, multilabel=multilabel,
                              transform=transform)
    return dataset


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets: save_to_disk folders, parquet and arrow files


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise missing_extra("hf-datasets", "datasets") from None
    return datasets


def _files_fingerprint(files: list[Path]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(files):
        stat = file.stat()
        digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_table(source: Source, split: str):
    """The ``datasets.Dataset`` of a split, and the files it was read from.

    A ``save_to_disk`` folder is memory-mapped as it is; parquet/arrow files go through ``load_dataset``, which
    writes them once as a memory-mapped arrow table under ``$WECOLORA_CACHE_DIR/hf-datasets`` (a copy of the
    bytes, no image decoded) and finds the splits in the file names (``train-*.parquet``, ``test/...``).
    """
    datasets = _import_datasets()
    path = Path(source.path).expanduser()
    try:
        if path.is_dir() and is_saved_dataset(path):
            files = _files_with(path, (".arrow", ".json"), depth=2)
            if not any(f.suffix == ".arrow" for f in files):
                raise UserError(f"{source.spec} is empty: it holds no rows (no .arrow file)")
            loaded = datasets.load_from_disk(str(path))
        else:
            files = [path] if path.is_file() else _files_with(path, TABLE_SUFFIXES, depth=2)
            kinds = {f.suffix.lower() for f in files}
            if len(kinds) != 1:
                raise UserError(f"{source.spec}: mixes {' and '.join(sorted(kinds))} files; keep one format per source")
            builder = "parquet" if kinds == {".parquet"} else "arrow"
            options = {"data_files": {"train": [str(path)]}} if path.is_file() else {"data_dir": str(path)}
            loaded = datasets.load_dataset(builder, cache_dir=str(cache_folder("hf-datasets")), **options)
    except UserError:
        raise
    except Exception as err:  # datasets and pyarrow raise many kinds for a damaged or foreign file
        raise UserError(f"{source.spec} cannot be read by datasets ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); repair it or give another --data") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        wanted = ("train",) if split == "train" else TEST_SPLIT_NAMES
        name = next((n for n in wanted if n in loaded), None)
        if name is None and split == "train" and len(names) == 1:
            name = names[0]
        if name is None:
            raise UserError(f"{source.spec} has no {split} split (its splits: {', '.join(names)})"
                            + ("; give the test images with --test-data" if split == "test" else ""))
        return loaded[name], files, name
    if split != "train":
        raise UserError(f"{source.spec} is a single split, so it is the train split only; give the test images with "
                        f"--test-data (or save a DatasetDict with a test split)")
    return loaded, files, "train"


def image_columns(features) -> list[str]:
    """Columns of ``datasets`` Image type; else columns of encoded bytes (binary, or a struct with ``bytes``)."""
    datasets = _import_datasets()
    found = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    if found:
        return found
    return [name for name, f in features.items()
            if (isinstance(f, datasets.Value) and f.dtype in ("binary", "large_binary"))
            or (isinstance(f, dict) and "bytes" in f)]


class TableImages(EncodedDataset):
    """A ``datasets`` table: images from ``image_column`` (encoded bytes, or a path), labels from a ClassLabel, list
    or value column. ``sample_ids`` are ``split/row``."""

    def __init__(self, table, image_column: str, *, split: str, targets, classes, multilabel, source: Source,
                 fingerprint: str, transform=None):
        super().__init__([f"{split}/{row:06d}" for row in range(len(table))], targets, classes,
                         multilabel=multilabel, transform=transform)
        datasets = _import_datasets()
        table = table.select_columns([image_column])
        if isinstance(table.features[image_column], datasets.Image):
            table = table.cast_column(image_column, datasets.Image(decode=False))
        self.table, self.column, self.source = table, image_column, source
        self.where, self.fingerprint = f"{source.spec} [{split}]", fingerprint

    def identity(self, i: int) -> str:
        return f"{self.fingerprint}:{self.sample_ids[i]}"

    def fetcher(self, indices: list[int]) -> _TableRows:
        return _TableRows(self.table, self.column, indices, self.where)


class _TableRows:
    """Encoded images of chosen rows of a ``datasets`` table (memory-mapped: pickles as a reference)."""

    def __init__(self, table, column: str, rows: list[int], where: str):
        self.table, self.column, self.rows, self.where = table, column, [int(r) for r in rows], where

    def __call__(self, p: int) -> bytes:
        value = self.table[self.rows[p]][self.column]
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                with open(value["path"], "rb") as f:
                    return f.read()
            raise OSError(f"row {self.rows[p]} holds no image (neither bytes nor a path)")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        raise OSError(f"row {self.rows[p]} of column {self.column!r} is not an encoded image")


def open_table(source: Source, split: str, *, image_column=None, label_column=None, classes=None, transform=None):
    """A Hugging Face ``datasets`` split: the image column is ``image_column`` or the one Image column; labels
    come from ``label_column`` or the one ClassLabel (or list of ClassLabel) column."""
    datasets = _import_datasets()
    table, files, name = load_table(source, split)
    where = f"{source.spec} [{name}]"
    features = table.features
    columns = list(features)
    if image_column is None:
        found = image_columns(features)
        if len(found) != 1:
            raise UserError(f"{where} has {'no' if not found else 'more than one'} image column (columns: "
                            f"{', '.join(columns)}); name it with --image-column")
        image_column = found[0]
    elif image_column not in features:
        raise UserError(f"{where} has no column {image_column!r} (--image-column); columns: {', '.join(columns)}")
    if len(table) == 0:
        raise UserError(f"{where} is empty: it holds no rows")
    label_columns = _table_label_columns(features, label_column, where, image_column)
    targets, names, multilabel = None, [], False
    if label_columns:
        if len(label_columns) > 1:
            raw = list(zip(*(table.data.column(c).to_pylist() for c in label_columns)))
            targets, names, multilabel = read_labels(raw, where=where, classes=classes, multi_columns=label_columns)
        else:
            feature = features[label_columns[0]]
            inner = getattr(feature, "feature", feature)
            label_names = inner.names if isinstance(inner, datasets.ClassLabel) else None
            targets, names, multilabel = read_labels(table.data.column(label_columns[0]).to_pylist(), where=where,
                                                     names=label_names, classes=classes)
    return TableImages(table, image_column, split=name, targets=targets, classes=names, multilabel=multilabel,
                       source=source, fingerprint=_files_fingerprint(files), transform=transform)


def _table_label_columns(features, label_column, where, image_column) -> list[str]:
    datasets = _import_datasets()
    columns = list(features)
    if label_column is not None:
        wanted = [label_column] if label_column in features else [c.strip() for c in label_column.split(",")]
        unknown = [c for c in wanted if c not in features]
        if unknown:
            raise UserError(f"{where} has no column {unknown[0]!r} (--label-column); columns: {', '.join(columns)}")
        return wanted
    found = [name for name, f in features.items() if name != image_column
             and isinstance(getattr(f, "feature", f), datasets.ClassLabel)]
    if len(found) == 1:
        return found
    named = [c for c in columns if c.lower() in ("label", "labels") and c != image_column]
    return named[:1]


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards


def _key_splitter():
    """WebDataset's grouping rule, ``dir/key.ext.ext2`` -> (``dir/key``, ``ext.ext2``): ``base_plus_ext``."""
    try:
        from webdataset.tariterators import base_plus_ext
    except ImportError:
        raise missing_extra("wds", "webdataset") from None
    return base_plus_ext


def index_shard(shard: Path) -> dict:
    """A shard's samples from its member headers: each sample's image member (the first whose extension is an
    image's), its data offset and size, and its ``.cls`` label (-1 without one). Only the headers and the
    ``.cls`` members are read. Remembered under ``$WECOLORA_CACHE_DIR/sources`` per (path, size, mtime)."""
    stat = shard.stat()
    key = hashlib.blake2b(f"{INDEX_FORMAT}:{shard.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(),
                          digest_size=16).hexdigest()
    record = cache_folder("sources") / f"tar-{key}.npz"
    if record.is_file():
        try:
            with np.load(record, allow_pickle=False) as saved:
                return {name: saved[name] for name in saved.files}
        except (OSError, ValueError):
            pass  # damaged: indexed again
    samples: dict[str, dict] = {}
    split_key = _key_splitter()
    try:
        with tarfile.open(shard, "r:") as archive:
            while (member := archive.next()) is not None:
                archive.members.clear()  # tarfile keeps every header it reads: hold one at a time
                if not member.isfile():
                    continue
                sample, ext = split_key(member.name)
                if sample is None:
                    continue
                entry = samples.setdefault(sample, {"label": -1})
                ext = ext.lower()
                if ext in SHARD_IMAGE_EXTENSIONS and "offset" not in entry:
                    entry.update(member=member.name, offset=member.offset_data, size=member.size)
                elif ext == "cls":
                    text = archive.extractfile(member).read().decode("utf-8", "replace").strip()
                    try:
                        entry["label"] = int(text)
                    except ValueError:
                        raise UserError(f"{shard}: {member.name} holds {text[:20]!r}, not an integer class") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"tar shard {shard} cannot be read ({err}); repair or remove it") from None
    images = [s for s in samples.values() if "offset" in s]
    index = {"member": np.array([s["member"] for s in images], dtype=str),
             "offset": np.array([s["offset"] for s in images], dtype=np.int64),
             "size": np.array([s["size"] for s in images], dtype=np.int64),
             "label": np.array([s["label"] for s in images], dtype=np.int64),
             "without_image": np.array(len(samples) - len(images), dtype=np.int64)}
    buffer = io.BytesIO()
    np.savez(buffer, **index)
    try:
        atomic_write_bytes(record, buffer.getvalue())
    except OSError:
        pass  # a read-only cache costs the next run a new index, not this one
    return index


class TarShards(EncodedDataset):
    """WebDataset shards: one image per sample (its first image member), ``.cls`` labels when every sample has
    one. ``sample_ids`` are ``shard.tar/member``; an image is read by seeking to its member's data."""

    def __init__(self, source: Source, shards: list[Path], indexes: list[dict], *, classes=None, transform=None):
        self.shards = [str(s) for s in shards]
        self.shard_of = np.concatenate([np.full(len(ix["offset"]), k, dtype=np.int32) for k, ix in enumerate(indexes)])
        self.offsets = np.concatenate([ix["offset"] for ix in indexes])
        self.sizes = np.concatenate([ix["size"] for ix in indexes])
        ids = [f"{shard.name}/{member}" for shard, ix in zip(shards, indexes) for member in ix["member"].tolist()]
        labels = np.concatenate([ix["label"] for ix in indexes])
        stats = [s.stat() for s in shards]
        self.shard_ids = [f"{s}:{st.st_size}:{st.st_mtime_ns}" for s, st in zip(self.shards, stats)]
        where = source.spec
        labelled = int((labels >= 0).sum())
        targets, names = None, []
        if labelled and labelled < len(labels):
            _logger.warning("%s: %d of %d samples have no .cls label: the shards are read unlabeled", where,
                            len(labels) - labelled, len(labels))
        elif labelled:
            targets, names, _ = read_labels(labels.tolist(), where=where, classes=classes)
        super().__init__(ids, targets, names, transform=transform)
        self.source, self.where = source, where
        self._members: _TarMembers | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_members": None}

    def identity(self, i: int) -> str:
        return f"{self.shard_ids[self.shard_of[i]]}:{self.sample_ids[i]}"

    def fetcher(self, indices: list[int]) -> _TarMembers:
        idx = np.asarray(indices, dtype=np.int64)
        return _TarMembers(self.shards, self.shard_of[idx], self.offsets[idx], self.sizes[idx])

    def read_bytes(self, i: int) -> bytes:
        if self._members is None:  # every member, with one set of open shards (item access, e.g. a probe)
            self._members = _TarMembers(self.shards, self.shard_of, self.offsets, self.sizes)
        return self._members(i)


class _TarMembers:
    """Chosen tar members, each read at its data's offset; each process opens the shards it needs (at most
    :data:`OPEN_SHARDS` at a time). Threads may share it (the decode checks and the store's header reads run in
    a thread pool): the open files are guarded by a lock."""

    def __init__(self, shards: list[str], shard_of: np.ndarray, offsets: np.ndarray, sizes: np.ndarray):
        self.shards, self.shard_of, self.offsets, self.sizes = shards, shard_of, offsets, sizes
        self._files: dict[int, object] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_lock": None}  # file handles and the lock stay in their process

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __call__(self, p: int) -> bytes:
        shard = int(self.shard_of[p])
        with self._lock:  # one seek + read at a time: threads would move each other's file position
            f = self._files.get(shard)
            if f is None:
                if len(self._files) >= OPEN_SHARDS:
                    self._files.pop(next(iter(self._files))).close()
                f = self._files[shard] = open(self.shards[shard], "rb")
            f.seek(int(self.offsets[p]))
            data = f.read(int(self.sizes[p]))
        if len(data) != int(self.sizes[p]):
            raise OSError(f"{self.shards[shard]} ends inside a member: it changed since it was indexed")
        return data


def open_shards(source: Source, *, classes=None, transform=None) -> TarShards:
    """WebDataset tar shards, indexed shard by shard (headers only; remembered per shard)."""
    shards = shard_paths(source.path)
    indexes = [index_shard(shard) for shard in shards]
    without = sum(int(ix["without_image"]) for ix in indexes)
    if without:
        _logger.warning("%s: %d sample(s) without an image member (%s) are left out", source.spec, without,
                        "/".join(SHARD_IMAGE_EXTENSIONS))
    if not sum(len(ix["offset"]) for ix in indexes):
        raise UserError(f"{source.spec}: the shards hold no image members ({'/'.join(SHARD_IMAGE_EXTENSIONS)})")
    return TarShards(source, shards, indexes, classes=classes, transform=transform)


def open_source(source: Source, split: str, *, transform=None, classes=None, folder_layout="auto",
                image_column=None, label_column=None):
    """Open a parsed source's split (folders, lists, ``datasets`` tables, tar shards); see the module docstring."""
    if source.kind == "folder":
        return open_folder(source, split, folder_layout=folder_layout, classes=classes, transform=transform)
    if source.kind == "hf-datasets":
        return open_table(source, split, image_column=image_column, label_column=label_column, classes=classes,
                          transform=transform)
    if split != "train":  # lists and shards are one split each
        raise UserError(f"{source.spec} is one split (a {'file list' if source.kind == 'list' else 'set of shards'}); "
                        f"give the test images with --test-data")
    if source.kind == "list":
        return open_list(source, image_column=image_column, label_column=label_column, classes=classes,
                         transform=transform)
    return open_shards(source, classes=classes, transform=transform)


__all__ = ["EncodedReader", "FileListDataset", "FileReader", "SourceDataset", "TableImages", "TarShards", "item_reader",
           "open_source", "read_labels", "walk_images"]
