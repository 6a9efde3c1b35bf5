"""The few-shot subset decoded once into a memory-mapped uint8 store, and its augmented views made on the device.

A per-image PIL pipeline (decode, RandomResizedCrop, flip, in DataLoader workers) feeds a GPU at a fraction of what
it trains at. As FFCV does, the subset is instead decoded ONCE into a store of bounded size: each image in RGB,
<<<<<<< HEAD
shrunk (antialiased, never enlarged) so that its short side is at most a little above the model's input size, and
kept at that size. A training batch is a few images read from the memory map, each placed on a canvas all images
share (so every batch has one shape, as ``torch.compile(dynamic=False)`` needs), then cropped, resized and flipped
on the device by one ``grid_sample`` call (:mod:`wecolora.data.augment`), with each image's box and flip drawn as
torchvision draws them from a generator seeded by (seed, view, image): view ``v`` of image ``i`` is the same in any
batch, order, worker or process, so the teacher cache stores tokens only.
=======
shrunk (antialiased, never enlarged) only if its short side exceeds the recipe's bound
(:func:`wecolora.data.views.short_side_bound`: 579 px for 224 px views, so that even the smallest crop keeps 224
stored pixels a side; a 500 x 375 photo is stored whole), and kept at that size. A training batch is a few images
read from the memory map, each placed on a canvas all images share (so every batch has one shape, as
``torch.compile(dynamic=False)`` needs), then cropped, resized and flipped on the device as PIL would from the
original (:func:`wecolora.data.augment.resized_crops`), with each image's box and flip drawn on its ORIGINAL size
as torchvision draws them, from a generator seeded by (seed, view, image): view ``v`` of image ``i`` is the same
in any batch, order, worker or process, so the teacher cache stores tokens only.
>>>>>>> wt-issue21

Layout: ``ROOT/<data fingerprint>-<bound>px/`` holds ``pixels.npy`` (1-D uint8: the subset's ``[3, h, w]`` images
one after the other, in subset order, each at its own stored size, as FFCV stores them), ``offsets.npy``
(``[n + 1]`` int64: image ``p`` is ``pixels[offsets[p]:offsets[p + 1]]``), ``sizes.npy`` (``[n, 2]``, each
image's stored height and width), ``originals.npy`` (``[n, 2]``, its height and width in the file: the boxes
are drawn there) and ``meta.json`` (``canvas``: the largest stored height and width). Only a
batch read pads its images to the canvas (:meth:`ImageStore.rows`): a mixed-orientation subset (4:3 and 3:4
photos) would otherwise pay a square canvas per image, about 1.3x its pixels, on disk and in the page cache. The
folder is built under a temporary name and renamed once complete, so a half-written store is never read, and every
later run on the same subset (an ablation grid, a rerun) reuses it. A process reading a store holds a shared lock
on its ``meta.json``, so ``wecolora cache clear`` leaves it alone (:mod:`wecolora.cache.admin`). Stores count
towards the cache cap with the teacher cache's entries: building one evicts the least recently used entries not in
use.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm.auto import tqdm

from wecolora.cache.admin import (
    MAX_GB_ENV,
    CacheCap,
    format_bytes,
    make_room,
    owner,
    remove_stale,
    touch,
)
from wecolora.data.datasets import PIL_ERRORS, load_rgb, no_longer_readable
from wecolora.data.subset import fingerprint_data
from wecolora.data.views import ViewRecipe, stored_boxes
from wecolora.errors import UserError
from wecolora.files import CACHE_ENV, cache_folder

_logger = logging.getLogger(__name__)

STORE_FORMAT = 3  # 1: every image on a canvas-sized row of a [n, 3, Hc, Wc] array; 2: no originals.npy
LONG_SIDE_LIMIT = 2  # x the bound: one panorama would otherwise widen every row of the shared canvas
BUILDING = re.compile(r"\.[^.]+\.(.+)\.[^.]+\.tmp")  # .NAME.HOST-PID.XXXX.tmp: a store being built
PIXELS, OFFSETS, SIZES, ORIGINALS, META = "pixels.npy", "offsets.npy", "sizes.npy", "originals.npy", "meta.json"


def stored_size(height: int, width: int, bound: int) -> tuple[int, int]:
    """An image's size in the store: shrunk, never enlarged, to a short side of at most ``bound`` and a long
    side of at most ``LONG_SIDE_LIMIT * bound``, keeping its aspect.

    >>> stored_size(800, 600, 579), stored_size(375, 500, 579), stored_size(100, 1000, 50)
    ((772, 579), (375, 500), (10, 100))
    """
    factor = min(1.0, bound / min(height, width), LONG_SIDE_LIMIT * bound / max(height, width))
    if factor == 1.0:
        return height, width
    return max(1, round(height * factor)), max(1, round(width * factor))


def image_offsets(sizes: np.ndarray) -> np.ndarray:
    """Where each image of stored ``sizes`` (``[n, 2]``) starts in the 1-D store, and where the last one ends.

    >>> image_offsets(np.array([[2, 3], [1, 1]])).tolist()
    [0, 18, 21]
    """
    return np.concatenate([[0], np.cumsum(3 * np.prod(sizes, axis=1, dtype=np.int64))]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The store


class ImageStore:
    """A complete store: ``pixels`` (1-D uint8, memory-mapped in each process on first use), ``offsets``
    (``[n + 1]``, where each image starts), ``sizes`` (``[n, 2]`` stored height and width), ``originals``
    (``[n, 2]`` height and width in the file), ``canvas`` (Hc, Wc) and the short-side ``bound``. Read images with
    :meth:`image` or, padded to the canvas, :meth:`rows`."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = Path(folder), meta
        self.canvas, self.bound = tuple(meta["canvas"]), meta["bound"]
        self.sizes = np.load(self.folder / SIZES)
        self.originals = np.load(self.folder / ORIGINALS)
        self.offsets = np.load(self.folder / OFFSETS)
        self._pixels = None

    def __len__(self) -> int:
        return self.meta["images"]

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(self.folder / PIXELS, mmap_mode="r")
        return self._pixels

    def image(self, position: int) -> np.ndarray:
        """Subset image ``position`` at its stored size, uint8 ``[3, h, w]`` (a view of the memory map)."""
        height, width = self.sizes[position]
        return self.pixels[self.offsets[position]:self.offsets[position + 1]].reshape(3, height, width)

    def rows(self, positions) -> np.ndarray:
        """The images at ``positions`` on the store's canvas, uint8 ``[B, 3, Hc, Wc]``: each at the top left, the
        rest repeating its last row and column (:meth:`ViewRecipe.apply` resamples inside each box: the padding
        is never a tap)."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        rows = np.empty((len(positions), 3, *self.canvas), dtype=np.uint8)
        for row, position in zip(rows, positions):
            image = self.image(position)
            _, height, width = image.shape
            row[:, :height, :width] = image
            row[:, :height, width:] = image[:, :, -1:]
            row[:, height:, :] = row[:, height - 1:height, :]
        return rows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}  # a loader worker maps the file itself; a pickled map is a copy

    def record(self) -> dict:
        """What a run's ``config.yaml`` records of the store it read."""
        return {"folder": str(self.folder), "images": len(self), "canvas": list(self.canvas), "bound": self.bound,
                "mb": round(self.meta["bytes"] / 1e6, 1)}


def open_store(dataset, indices, *, bound: int, cache_dir: str | os.PathLike | None = None, num_workers: int = 0,
               progress: bool = False, teacher_cache_dir: str | os.PathLike | None = None,
               cap: CacheCap | None = None) -> ImageStore:
    """The subset's store, built first (each image decoded once, in ``num_workers`` loader workers) if missing.

    Before a build, room for the store is made under the cap of the image stores and teacher entries together
    (:func:`wecolora.cache.admin.make_room`); a store that cannot fit is built anyway, with a warning.

    Args:
        dataset: an image folder (``samples``: JPEGs decode with ``torchvision.io.decode_jpeg``, anything else
            with PIL) or an in-memory dataset (``images``, grey uint8 ``[N, H, W]``: stored without decoding).
        indices: the few-shot subset, its unreadable images already dropped (:func:`wecolora.data.subset.drop_unreadable`).
        bound: the largest stored short side (:func:`short_side_bound`); part of the store's key.
        cache_dir: the folder of stores (default ``$WECOLORA_CACHE_DIR/images``, else ``~/.cache/wecolora/images``).
        progress: show a progress bar while building.
        teacher_cache_dir: the run's teacher cache folder, counted under the cap (default ``ROOT/teacher``).
        cap: the run's cache cap (:class:`wecolora.cache.admin.CacheCap`; default: resolved here from
            ``$WECOLORA_CACHE_MAX_GB``, else 50 GB, over ``teacher_cache_dir`` and this store's folder).

    Example:
        >>> store = open_store(open_dataset("mnist-5k"), range(100), bound=73)  # doctest: +SKIP
        >>> store.rows([0, 1]).shape, store.image(0).shape  # doctest: +SKIP
        ((2, 3, 28, 28), (3, 28, 28))
    """
    indices = [int(i) for i in indices]
    root = cache_folder("images", cache_dir)
    fingerprint = fingerprint_data(dataset, indices)
    folder = root / f"{fingerprint}-{bound}px"
    store = _open(folder, len(indices), bound)
    if store is None:
        cap = cap or CacheCap.resolve(None, teacher_cache_dir, root)
        _build(folder, dataset, indices, bound, fingerprint=fingerprint, num_workers=num_workers, progress=progress,
               cap=cap.max_bytes, capped=list(cap.folders))
        store = _open(folder, len(indices), bound)
    return store


def _open(folder: Path, images: int, bound: int) -> ImageStore | None:
    """The store in ``folder``; None if there is none, or a damaged one (then removed, to be built again)."""
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != STORE_FORMAT:  # an older layout: built again in this one
            _logger.info("image store %s has the format %s of an older wecolora; building it again in format %d",
                         folder, meta.get("format"), STORE_FORMAT)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        else:
            store = ImageStore(folder, meta)
            complete = (store.bound == bound and store.sizes.shape == (images, 2) == store.originals.shape
                        and np.array_equal(store.offsets, image_offsets(store.sizes))
                        and store.pixels.shape == (store.offsets[-1],))
            problem = None if complete else "its files do not match its meta.json"
    except (OSError, ValueError, KeyError) as err:
        problem = str(err)
    if problem is None:
        _hold(store)
        return store
    _logger.warning("image store %s is damaged (%s); building it again", folder, problem)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _hold(store: ImageStore) -> None:
    """Lock the store (shared, on its ``meta.json``) while this process may read it, and stamp it used:
    ``wecolora cache clear`` leaves a locked entry alone and orders the others by that stamp (:mod:`wecolora.cache.admin`)."""
    fd = os.open(store.folder / META, os.O_RDONLY)
    with contextlib.suppress(OSError):  # a file system without locks: the store is not protected
        fcntl.flock(fd, fcntl.LOCK_SH)
    weakref.finalize(store, os.close, fd)  # the lock goes with the store
    touch(store.folder)


def _build(folder: Path, dataset, indices: list[int], bound: int, *, fingerprint: str, num_workers: int,
           progress: bool, cap: int, capped: list[Path]) -> None:
    """Decode the subset into ``folder``: room made under ``cap`` in the ``capped`` folders first, then written
    under a temporary name, renamed when complete."""
    source = _Decoder(dataset, indices, bound)
    meta = {"format": STORE_FORMAT, "images": len(indices), "canvas": list(source.canvas), "bound": bound,
            "bytes": int(source.offsets[-1]), "data": fingerprint}
    if not make_room(capped, meta["bytes"], cap):  # the store is built anyway: training needs it
        _logger.warning("image store: the cache is over its %s cap with this %s store (entries in use fill it, or "
                        "the store alone exceeds it); raise the cap with --cache-max-gb or $%s",
                        format_bytes(cap), format_bytes(meta["bytes"]), MAX_GB_ENV)
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(folder.parent, BUILDING)  # half-built stores of builders that died
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.{owner()}.",
                                    suffix=".tmp"))
        _write(tmp, source, meta, num_workers=num_workers, progress=progress)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep a shared cache from other users
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / META).is_file():
                raise
            shutil.rmtree(tmp)  # another process built the same store meanwhile
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # no room, no permission: the user can fix it
            raise UserError(f"cannot write the image store of this subset ({meta['bytes'] / 1e9:.2f} GB) in "
                            f"{folder.parent} ({err}); free space there or point {CACHE_ENV} at another folder") from None
        raise
    _logger.info("image store: %d images up to %dx%d (%.1f MB) in %s", len(indices), *source.canvas,
                 meta["bytes"] / 1e6, folder)


def _write(tmp: Path, source: _Decoder, meta: dict, *, num_workers: int, progress: bool) -> None:
    """Fill ``tmp`` with the store's files, every image decoded by ``source`` in loader workers, and fsync them."""
    offsets = source.offsets
    pixels = np.lib.format.open_memmap(tmp / PIXELS, mode="w+", dtype=np.uint8, shape=(int(offsets[-1]),))
    if hasattr(os, "posix_fallocate"):  # reserve the blocks now: a full disk fails here, not with SIGBUS later
        with open(tmp / PIXELS, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    loader = DataLoader(source, batch_size=None, num_workers=num_workers)  # in subset order
    for position, image in enumerate(tqdm(loader, total=len(source), desc="image store", unit="image",
                                          disable=not progress)):
        if isinstance(image, UserError):  # raised here, not in the worker, to stay one line
            raise image
        pixels[offsets[position]:offsets[position + 1]] = image.numpy().reshape(-1)
    pixels.flush()
    del pixels
    np.save(tmp / OFFSETS, offsets)
    np.save(tmp / SIZES, source.sizes)
    np.save(tmp / ORIGINALS, source.originals)
    (tmp / META).write_text(json.dumps(meta, indent=1))
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(path, 0o644)


class _Decoder(torch.utils.data.Dataset):
    """Item ``p``: subset image ``p`` at its stored size, uint8 ``[3, h, w]``, or the UserError reading it raised.

    The stored sizes, and so the offsets and the canvas, come from the files' headers (or the arrays' shape)
    before any decoding.
    """

    def __init__(self, dataset, indices: list[int], bound: int):
        images = getattr(dataset, "images", None)
        if isinstance(images, np.ndarray):  # ArrayDataset: grey [N, H, W]
            self.arrays, self.paths = images, None
            self.indices = indices
            headers = [(*images.shape[1:3], False)] * len(indices)
        else:  # an image folder
            self.arrays, self.paths = None, [dataset.samples[i][0] for i in indices]
            with ThreadPoolExecutor(max_workers=8) as pool:
                headers = list(pool.map(_header, self.paths))
        self.jpeg = [jpeg for _, _, jpeg in headers]
        self.originals = np.array([(h, w) for h, w, _ in headers], dtype=np.int64).reshape(-1, 2)
        self.sizes = np.array([stored_size(h, w, bound) for h, w, _ in headers], dtype=np.int64).reshape(-1, 2)
        self.canvas = tuple(int(s) for s in self.sizes.max(axis=0)) if len(headers) else (1, 1)
        self.offsets = image_offsets(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, position: int) -> torch.Tensor | UserError:
        try:
            image = self._read(position)
        except UserError as err:
            return err
        height, width = (int(s) for s in self.sizes[position])
        if image.shape[1:] != (height, width):
            image = shrink(image, height, width)
        return image

    def _read(self, position: int) -> torch.Tensor:
        """The image as it is, uint8 RGB ``[3, H, W]``."""
        if self.arrays is not None:
            return torch.from_numpy(np.array(self.arrays[self.indices[position]]))[None].expand(3, -1, -1)
        path = self.paths[position]
        if self.jpeg[position]:
            from torchvision.io import ImageReadMode, decode_jpeg, read_file

            try:
                return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
            except RuntimeError:
                pass  # an odd JPEG that PIL may still read
        return torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)  # HWC -> CHW


def _header(path: str) -> tuple[int, int, bool]:
    """``(height, width, whether torchvision decodes it: a YCbCr/RGB JPEG)`` from a file's header."""
    try:
        with Image.open(path) as img:
            return img.height, img.width, img.format == "JPEG" and img.mode == "RGB"
    except PIL_ERRORS as err:
        raise no_longer_readable(path, err) from None


def shrink(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[3, H, W]`` resized down to ``(height, width)``: antialiased bicubic, PIL's filter (a = -0.5)."""
    x = F.interpolate(image[None].float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Views made on the device


class StoreBatches(torch.utils.data.Dataset):
    """One view of the subset, indexed by a LIST of subset positions (one call per batch, in a loader worker).

    An item is a dict: ``pixels`` (uint8 canvas rows ``[B, 3, Hc, Wc]``), ``positions`` ``[B]``, ``boxes``
    ``[B, 4]`` (drawn on the originals, given on the stored copies) and ``flips`` ``[B]`` (the view, cut on the
    device by :meth:`ViewRecipe.apply`) and, when the
    view is in the teacher ``cache``, ``tokens`` (one ``[B, N, D]`` tensor per matched block, in the cache dtype).
    """

    def __init__(self, store: ImageStore, indices, recipe: ViewRecipe, *, seed: int, view: int, cache=None):
        self.store, self.indices, self.recipe = store, np.asarray(indices, dtype=np.int64), recipe
        self.seed, self.view, self.cache = seed, view, cache

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, positions) -> dict:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)  # accelerate nests the sampler's list once more
        originals, sizes = self.store.originals[positions], self.store.sizes[positions]
        boxes, flips = self.recipe.params(self.seed, self.view, self.indices[positions], originals)
        batch = {"pixels": torch.from_numpy(self.store.rows(positions)), "positions": torch.from_numpy(positions),
                 "boxes": stored_boxes(boxes, originals, sizes), "flips": flips}
        if self.cache is not None:
            batch["tokens"] = self.cache.tokens(self.view, batch["positions"])
        return batch


def store_loader(batches: StoreBatches, batch_size: int, generator: torch.Generator, *, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """Batches of ``batches`` in the order a per-image ``DataLoader(batch_size, RandomSampler(generator))`` gives.

    ``accelerator.prepare_data_loader`` shards it across processes like any loader.
    """
    sampler = BatchSampler(RandomSampler(range(len(batches)), generator=generator), batch_size, drop_last=False)
    return DataLoader(batches, sampler=sampler, batch_size=1, collate_fn=first_item, generator=generator,
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False)


def first_item(items: list):
    """``collate_fn`` for a loader whose every item is already a batch (``batch_size=1`` over lists of positions)."""
    return items[0]
