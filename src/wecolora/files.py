"""Atomic file and folder writes (a kill at any moment leaves the old complete artifact or the new one),
and where wecolora's caches live.

Files are written under a temporary name in the same folder, fsynced, then renamed over the target.
Folders are swapped in one step where the kernel can (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere
the old folder is parked as ``.NAME.old`` for the instant between two renames and :func:`recover`
puts it back if a kill landed there.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import functools
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

from wecolora.errors import UserError

# OSError numbers that mean "the output location cannot take the write" (the user can fix them).
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) via a temporary file, fsync and rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would have
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux >= 3.15); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # kernel or filesystem without RENAME_EXCHANGE
    raise OSError(code, os.strerror(code), str(b))


_TEMPORARY = "?" * 8 + ".tmp"  # the random part of mkdtemp/mkstemp names, then our suffix


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def recover(path: str | Path, *, clean: bool = True) -> None:
    """Undo what a kill in the middle of :func:`atomic_dir` may have left next to ``path``.

    A parked ``.NAME.old`` whose replacement never arrived is moved back; with ``clean``, stale
    ``.NAME.*.tmp`` folders or files (half-written replacements) are removed.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)
    elif old.exists():
        _remove(old)
    if clean and path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.{_TEMPORARY}"):
            _remove(stale)


def recover_folder(folder: str | Path, *, clean: bool = True) -> None:
    """:func:`recover` every artifact of a run folder: parked folders are put back first (that only
    restores earlier results); with ``clean``, every stale temporary is removed too."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for parked in folder.glob(".*.old"):
        recover(folder / parked.name[1:-len(".old")], clean=False)
    if clean:
        for stale in folder.glob(f".*.{_TEMPORARY}"):
            _remove(stale)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder; on success it replaces ``path`` (an existing one is swapped out).

    Example:
        with atomic_dir(run / "student") as tmp:
            save_model(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give what mkdir() would have
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o666 & ~_umask())  # safetensors writes 0600; give what open() would have
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous version
        else:
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                os.replace(path, old)  # a kill here is undone by recover()
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def disk_error(err: BaseException) -> str | None:
    """One line saying which write failed and why, when ``err`` is one the user can fix (disk full,
    quota, file size limit, read-only folder or file system); None otherwise.

    safetensors reports I/O failures as ``SafetensorError('... (os error 28)')``, so the text is read too.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            where = f" {err.filename}" if err.filename else ""
            verb = "access" if err.errno in (errno.EACCES, errno.EPERM) else "write"
            return f"cannot {verb}{where}: {err.strerror or os.strerror(err.errno)}"
        match = re.search(r"\(os error (\d+)\)", str(err))
        if match and int(match.group(1)) in DISK_ERRNOS:
            return f"cannot write: {os.strerror(int(match.group(1)))}"
        err = err.__cause__ or err.__context__
    return None


CACHE_ENV = "WECOLORA_CACHE_DIR"  # one root for every cache: features/ (probe features), teacher/ (teacher tokens)
DEFAULT_CACHE_ROOT = Path("~/.cache/wecolora")


def cache_folder(kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A cache's folder: ``cache_dir`` if given, else ``$WECOLORA_CACHE_DIR/<kind>``, else ``~/.cache/wecolora/<kind>``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else DEFAULT_CACHE_ROOT).expanduser() / kind


def check_writable(output: str | Path, option: str = "--output") -> Path:
    """``output`` is a folder (or can become one) that this process may write into."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {output} exists and is not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {output}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {output}: {existing} is not writable (read-only folder or file system); "
                        f"choose another {option}")
    return out


def csv_text(rows: list[dict], columns, *, lineterminator: str = "\r\n") -> str:
    """CSV text of rows (``summary.csv``, ``results.csv``, ``report.csv``), columns in the given order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
