"""Reproducible views and an on-disk cache of the frozen teacher's tokens for them.

The teacher is frozen and the few-shot subset is small, so its last-block tokens are a function of
(teacher weights, image, augmentation view) only. View ``v`` of image ``i`` is reproducible (its crop and
flip are drawn from :func:`view_seed` ``(seed, v, i)``, see :mod:`wecolora.cache.images`; epoch ``e`` uses
view ``e mod K``), and :class:`TeacherCache` stores, per view, the teacher's tokens (fp16, or bf16 for a bf16
teacher) as memory-mapped ``.npy`` files; the views themselves are cut again from the image store, exactly.
An entry is keyed by the teacher's weights, the subset's images, the view recipe, the view seed, the matched
blocks and the teacher's precision, so one entry serves every student of an ablation grid (modes,
reductions, ranks, lrs) and every rerun.

Layout: ``ROOT/<key>/meta.json`` (what the key is made of) and ``ROOT/<key>/view0003.tokens.npy``.
A view's files are written under temporary names and renamed when every row is filled, tokens last:
a view is complete exactly when its tokens file exists, so a half-written view is never read. The copy
to the host and the file writes run on a background thread (:class:`ViewWriter`), off the training step.

The cache folder and the image stores are capped together (:func:`wecolora.cache.admin.cache_cap_bytes`,
50 GB by default): opening an entry for a run, and starting each view, evicts the least recently used
teacher entries or image stores that no live process uses (:func:`wecolora.cache.admin.make_room`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wecolora.cache.admin import (
    MAX_GB_ENV,
    CacheCap,
    format_bytes,
    make_room,
    mark_in_use,
    owner,
    read_entry,
    release_in_use,
    remove_stale,
    touch,
)
from wecolora.data.subset import fingerprint_data
from wecolora.files import atomic_write_text, cache_folder
from wecolora.teachers.vit import model_fingerprint

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: views resampled as PIL does from the original (wecolora 0.4); 1: by grid_sample
FP16_MAX = 65504.0


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The teacher cache folder: the argument, else ``$WECOLORA_CACHE_DIR/teacher``, else ``~/.cache/wecolora/teacher``."""
    return cache_folder("teacher", cache_dir)


# ---------------------------------------------------------------------------------------------
# Reproducible views


# ---------------------------------------------------------------------------------------------
# Keys


def cache_key(*, teacher: nn.Module, dataset, indices: list[int], transform, seed: int, teacher_blocks: list[int],
              norm: bool, precision: str) -> dict:
    """What a cache entry depends on; its digest names the entry's folder."""
    return {
        "format": FORMAT_VERSION,
        "teacher": model_fingerprint(teacher),
        "data": fingerprint_data(dataset, indices),
        "images": len(indices),
        "transform": repr(transform),
        "seed": int(seed),
        "teacher_blocks": [int(b) for b in teacher_blocks],
        "norm": bool(norm),
        "precision": precision,
        "dtype": "bfloat16" if precision == "bf16" else "float16",
    }


def _digest(key: dict) -> str:
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()


# ---------------------------------------------------------------------------------------------
# The cache


def _to_numpy(tokens: torch.Tensor) -> np.ndarray:
    tokens = tokens.detach().to("cpu").contiguous()
    return tokens.view(torch.int16).numpy() if tokens.dtype == torch.bfloat16 else tokens.numpy()


def _from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def view_nbytes(images: int, token_shape: tuple[int, ...]) -> int:
    """Bytes of one cached view: ``images`` rows of 16-bit tokens of ``token_shape`` (blocks, tokens, width)."""
    return images * int(np.prod(token_shape)) * 2


class TeacherCache:
    """One cache entry: per view, the teacher's tokens (the views themselves are cut again from the image store).

    Example:
        >>> cache = TeacherCache.open(default_cache_dir(), teacher=teacher, dataset=ds, indices=subset,
        ...                           transform=tf, seed=0, teacher_blocks=[11], norm=False, precision="fp32")  # doctest: +SKIP
        >>> cache.has_view(0)  # doctest: +SKIP
    """

    def __init__(self, folder: Path, key: dict, *, cap: CacheCap | None = None, view_bytes: int | None = None):
        self.folder, self.key = Path(folder), key
        self.dtype = torch.bfloat16 if key["dtype"] == "bfloat16" else torch.float16
        self.cap = cap  # None: uncapped
        self.view_bytes = view_bytes  # the size of one view, when known

    @classmethod
    def open(cls, root: str | os.PathLike, *, cap: CacheCap | None = None, view_bytes: int | None = None,
             **key_args) -> TeacherCache:
        """The entry for these inputs under ``root`` (created, with its ``meta.json``, if new); under ``cap``,
        room for each new view of ``view_bytes`` is made before it is written."""
        key = cache_key(**key_args)
        folder = Path(root) / _digest(key)
        if not (folder / "meta.json").is_file():
            atomic_write_text(folder / "meta.json", json.dumps(key, indent=1))
        else:
            touch(folder)  # last used: what eviction orders by
        remove_stale(folder)  # view files of writers that died
        return cls(folder, key, cap=cap, view_bytes=view_bytes)

    def _path(self, view: int) -> Path:
        """View ``view``'s tokens file (its name is the view's completion marker)."""
        return self.folder / f"view{view:04d}.tokens.npy"

    def has_view(self, view: int) -> bool:
        """Whether view ``view``'s tokens are complete and readable.

        A file damaged after it was written (truncated, wrong row count) counts as missing: the view is
        computed again and replaces it.
        """
        if not self._path(view).is_file():
            return False
        try:
            tokens = np.load(self._path(view), mmap_mode="r")
        except (OSError, ValueError) as err:
            _logger.warning("teacher cache: view %d in %s is unreadable (%s); computing it again", view, self.folder, err)
            return False
        return len(tokens) == self.key["images"]

    def load_view(self, view: int) -> np.ndarray:
        """Memory-mapped tokens ``[n, blocks, N, D]`` of a complete view."""
        return np.load(self._path(view), mmap_mode="r")

    def tokens(self, view: int, positions: torch.Tensor) -> list[torch.Tensor]:
        """Cached tokens of some subset positions, one ``[B, N, D]`` tensor per matched block."""
        return list(_from_numpy(self.load_view(view)[positions.cpu().numpy()], self.dtype).unbind(1))

    def writer(self, view: int, size: int) -> ViewWriter:
        """A writer that fills view ``view`` (``size`` rows) batch by batch and commits it when complete.

        Under a cap, room for the view is made first (least recently used entries or image stores evicted);
        when there is none (other entries in use fill the cap), the writer stores nothing and says so once.
        """
        writer = ViewWriter(self, view, size)
        if self.cap is not None and self.view_bytes:
            if not make_room(list(self.cap.folders), self.view_bytes, self.cap.max_bytes, keep=self.folder):
                _logger.warning("teacher cache: no room for view %d under the %s cap (entries in use by other runs "
                                "and this run's image store fill it); it is not cached", view,
                                format_bytes(self.cap.max_bytes))
                writer.failed = True
        return writer


class ViewWriter:
    """Fills one view's tokens file under a temporary name; :meth:`commit` renames it once every row is written.

    :meth:`write` rounds the batch's tokens to the cache dtype on their device and hands them to a
    background thread (one per view), which copies them to the host and writes them into the memory-mapped
    files; a bounded queue (:attr:`QUEUE_BATCHES` batches) holds the batches in flight, so a slow disk slows
    training down rather than filling memory. A disk error in the thread (full, read-only) costs the view,
    not the run: it is logged at the next :meth:`write` or at :meth:`commit` and the view is not cached. Any
    other error in the thread is raised there. Tensors handed to :meth:`write` must not be changed in place
    afterwards (they are written later).
    """

    QUEUE_BATCHES = 4

    def __init__(self, cache: TeacherCache, view: int, size: int):
        self.cache, self.view, self.size = cache, view, size
        self.filled = np.zeros(size, dtype=bool)
        self._tmp: Path | None = None  # the tokens file being written, under a temporary name
        self._tokens: np.ndarray | None = None  # its memory map
        self.failed = False
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # raised in the thread, not yet reported
        self._stop = False  # the thread discards what is still queued

    def _tokens_file(self, row_shape: tuple[int, ...], dtype) -> np.ndarray:
        """The view's memory-mapped tokens file under its temporary name, made by the first batch."""
        if self._tokens is None:
            self.cache.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache.folder, suffix=".tmp",
                                       prefix=f".view{self.view:04d}.tokens.{owner()}.")
            os.close(fd)
            self._tmp = Path(tmp)
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(self.size, *row_shape))
            # Reserve the blocks now: a full disk then fails here with OSError, not later with SIGBUS on the memmap.
            if hasattr(os, "posix_fallocate"):
                with open(tmp, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            self._tokens = array
        return self._tokens

    def _store(self, positions: torch.Tensor, stored: torch.Tensor) -> None:
        """On the writer thread: one batch from the device into the file."""
        rows = positions.cpu().numpy()
        token_dtype = np.int16 if self.cache.dtype == torch.bfloat16 else np.float16
        self._tokens_file(tuple(stored.shape[1:]), token_dtype)[rows] = _to_numpy(stored)
        self.filled[rows] = True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._stop or self._error is not None:
                continue  # drained, so that a producer waiting on a full queue never blocks
            try:
                self._store(*item)
            except BaseException as err:  # reported on the training thread (_report)
                self._error = err

    def _drain(self) -> None:
        """Wait until the thread has handled every queued batch, and end it."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = self._queue = None

    def _report(self) -> None:
        """Surface an error of the writer thread: a disk error costs the view (a warning), any other is raised."""
        err = self._error
        if err is None:
            return
        self._stop = self.failed = True
        self._drain()
        self._error = None
        self._delete_files()
        if not isinstance(err, OSError):
            raise err
        _logger.warning("teacher cache: cannot store view %d in %s (%s); it is not cached", self.view,
                        self.cache.folder, err)

    def write(self, positions: torch.Tensor, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Store a batch (tokens ``[B, N, D]`` per block) and return the tokens as stored, in fp32.

        Training on the returned values, not the unrounded ones, makes a cold run equal a warm rerun. The
        rounding happens here, on the tokens' device; the copy to the host and the write happen on the
        writer thread.
        """
        self._report()
        stacked = torch.stack([t.detach() for t in tokens], dim=1)  # [B, blocks, N, D]
        stored = stacked.to(self.cache.dtype)
        if self.cache.dtype == torch.float16 and not torch.isfinite(stored).all() and torch.isfinite(stacked).all():
            if not self.failed:
                _logger.warning("teacher tokens exceed the fp16 range (|x| > %g): view %d is not cached", FP16_MAX, self.view)
            self.failed = self._stop = True
            return [t.float() for t in tokens]
        if not self.failed:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.QUEUE_BATCHES)
                self._thread = threading.Thread(target=self._run, name=f"wecolora-view{self.view:04d}-writer",
                                                daemon=True)
                self._thread.start()
            self._queue.put((positions, stored))
        return list(stored.float().unbind(1))

    def commit(self) -> bool:
        """Wait for the writer thread, then rename the tokens file into place if every row was written; else
        discard it. A disk error in the thread is a warning and False; any other is raised."""
        self._drain()
        self._report()
        if self.failed or not self.filled.all() or self._tokens is None:
            self.abort()
            return False
        self._tokens.flush()
        self._tokens = None
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(self._tmp, 0o644)  # mkstemp's 0600 would keep a shared cache from other users
        os.replace(self._tmp, self.cache._path(self.view))
        self._tmp = None
        touch(self.cache.folder)
        return True

    def abort(self) -> None:
        """Stop the writer thread (queued batches are dropped) and delete the temporary files."""
        self._stop = True
        self._drain()
        if self._error is not None and not isinstance(self._error, OSError):
            _logger.warning("teacher cache: the writer of view %d failed (%r); the view is discarded", self.view,
                            self._error)
        self._error = None
        self._delete_files()

    def _delete_files(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
        self._tmp = self._tokens = None


class SharedWriter:
    """A :class:`ViewWriter` shared by the processes of a multi-process run (torchrun).

    Each process computes the teacher's tokens for its own batches; they are gathered every step and
    the first process stores them all, so a view is written once and whole. Each process trains on
    its batch's tokens rounded as stored, as a single-process cold run does.
    """

    def __init__(self, writer: ViewWriter, accelerator):
        self.writer, self.accelerator = writer, accelerator

    def write(self, positions: torch.Tensor, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        stacked = torch.stack([t.detach() for t in tokens], dim=1)  # [B, blocks, N, D]
        stored = stacked.to(self.writer.cache.dtype)
        overflow = (self.writer.cache.dtype == torch.float16 and not torch.isfinite(stored).all()
                    and bool(torch.isfinite(stacked).all()))
        parts = {"positions": positions.to(stacked.device, torch.long), "tokens": stored,
                 "overflow": torch.tensor([int(overflow)], device=stacked.device)}
        gathered = self.accelerator.gather(parts)  # accelerate's even batches: the same size on every process
        if self.accelerator.is_main_process:
            if gathered["overflow"].any():
                if not self.writer.failed:
                    _logger.warning("teacher tokens exceed the fp16 range (|x| > %g): view %d is not cached",
                                    FP16_MAX, self.writer.view)
                self.writer.failed = True
            else:
                self.writer.write(gathered["positions"], list(gathered["tokens"].unbind(1)))
        return [t.float() for t in tokens] if overflow else list(stored.float().unbind(1))

    def commit(self) -> bool:
        return self.writer.commit() if self.accelerator.is_main_process else False

    def abort(self) -> None:
        if self.accelerator.is_main_process:
            self.writer.abort()


def open_for_run(enabled: bool, cache_dir: str | None, *, teacher: nn.Module, dataset, indices: list[int], transform,
                 seed: int, teacher_blocks: list[int], norm: bool, precision: str, views: int,
                 cap: CacheCap | None = None) -> TeacherCache | None:
    """The cache entry a distillation run uses, or None when the cache is off or cannot serve this run.

    The cache folder and the image-store folder are kept under the run's one cap (``cap``; default: resolved
    from ``$WECOLORA_CACHE_MAX_GB``, else 50 GB, :class:`wecolora.cache.admin.CacheCap`): room for the run's
    missing views is made by evicting the least recently used entries or image stores that no live process
    uses. The cache is skipped, with a warning, when those views would not fit under the cap or on the
    disk. With several processes the first one writes the entry (:class:`SharedWriter`) and all read it,
    so it belongs on a file system every node sees.
    """
    release_in_use()  # the entry of this process's previous run (an ablate grid's) is free again
    if not enabled:
        return None
    root = default_cache_dir(cache_dir)
    cap = cap or CacheCap.resolve(None, cache_dir)
    tokens = len(teacher_blocks), teacher.patch_embed.num_patches + teacher.num_prefix_tokens, teacher.embed_dim
    per_view = view_nbytes(len(indices), tokens)
    try:
        cache = TeacherCache.open(root, cap=cap, view_bytes=per_view, teacher=teacher, dataset=dataset,
                                  indices=indices, transform=transform, seed=seed, teacher_blocks=teacher_blocks,
                                  norm=norm, precision=precision)
        mark_in_use(cache.folder)  # from now on no other run evicts it
    except OSError as err:  # an unwritable cache folder costs speed, not the run
        _logger.warning("teacher cache: cannot use %s (%s); training without it (--teacher-cache DIR elsewhere)",
                        root, err)
        return None
    missing = [v for v in range(views) if not cache.has_view(v)]
    need = len(missing) * per_view
    own = read_entry(cache.folder, root.name).bytes
    free = shutil.disk_usage(cache.folder).free
    size = format_bytes
    if own + need > cap.max_bytes:
        reason = (f"this run's {views} views need {size(own + need)}, over the cache's {size(cap.max_bytes)} cap "
                  f"(--cache-max-gb or ${MAX_GB_ENV} higher, or fewer --cache-views)")
    elif need and not make_room(list(cap.folders), need, cap.max_bytes, keep=cache.folder):
        reason = (f"{len(missing)} views need {size(need)} but entries in use by other runs and this run's image "
                  f"store fill the {size(cap.max_bytes)} cap of {' and '.join(map(str, cap.folders))} (--cache-max-gb higher; see "
                  f"`wecolora cache list`)")
    elif need > free - (1 << 30):
        reason = (f"{len(missing)} views need {size(need)} but {root} has {size(free)} free (--teacher-cache DIR "
                  f"elsewhere, fewer --cache-views, or --no-teacher-cache)")
    else:
        _logger.info("teacher cache: %s (%d of %d views stored, %s per view, cap %s)", cache.folder,
                     views - len(missing), views, size(per_view), size(cap.max_bytes))
        return cache
    _logger.warning("teacher cache: %s; training without it", reason)
    release_in_use()
    return None


def clear(root: str | os.PathLike | None = None) -> None:
    """Delete every teacher cache entry under ``root`` (default :func:`default_cache_dir`)."""
    shutil.rmtree(default_cache_dir(root), ignore_errors=True)
