"""What is in wecolora's caches, who is using an entry, the size cap, and clearing them.

Standard library only, so that ``wecolora cache list`` answers without importing torch.

The caches share one root (:func:`wecolora.files.cache_folder`): ``ROOT/<kind>/<entry>``, where kind is
``teacher`` (a folder per entry: ``meta.json`` plus view files, see :mod:`wecolora.cache.teacher`),
``images`` (a folder per image store, see :mod:`wecolora.cache.images`), ``features`` (one ``.safetensors``
file per entry) or any other kind a later version adds (listed
generically: size and age). A teacher entry's or image store's "last used" is its ``meta.json`` mtime,
stamped each time a run opens it or stores a view in it; other entries' is their mtime. The cap covers
teacher entries and image stores together (:func:`capped_folders`); feature files are not counted.

Liveness: a run holds a shared ``flock`` on the ``meta.json`` of the teacher entry it trains with and of
the image store it reads (the kernel drops it when the process ends, even by SIGKILL), and a writer names its process ``HOST-PID``
(:func:`owner`) in its temporary files. An entry locked by a live process, or holding a live writer's
temporary file, is never evicted or cleared; temporary files of dead writers on this host are removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wecolora.errors import UserError
from wecolora.files import CACHE_ENV, DEFAULT_CACHE_ROOT, cache_folder

_logger = logging.getLogger(__name__)

MAX_GB_ENV = "WECOLORA_CACHE_MAX_GB"
DEFAULT_MAX_GB = 50.0  # default cap (decimal GB): holds 10 token-only views of 1% of ImageNet with ViT-B (39 GB)
GB = 1e9
REMOTE_STALE_SECONDS = 24 * 3600  # a file of another machine's process counts as live this long after its last write
_TEMP = re.compile(r"\.view\d+\.[a-z]+\.(.+)\.[^.]+\.tmp")  # .view0003.tokens.HOST-PID.XXXX.tmp
_EVICTING = ".evicting-"  # an entry being deleted is first renamed to .evicting-NAME.XXXX
_KEY_FIELDS = (("teacher", "teacher"), ("model", "teacher"), ("images", "images"), ("n", "images"),
               ("precision", "precision"), ("split", "split"), ("pooling", "pooling"), ("seed", "seed"))


def cache_cap_bytes(max_gb: float | None = None) -> int:
    """The cap of teacher entries and image stores together, in bytes: ``max_gb``, else ``$WECOLORA_CACHE_MAX_GB``, else 50 GB.

    >>> cache_cap_bytes(0.5)
    500000000
    """
    if max_gb is None:
        text = os.environ.get(MAX_GB_ENV, "").strip()
        try:
            max_gb = float(text) if text else DEFAULT_MAX_GB
        except ValueError:
            max_gb = None
        if max_gb is None or not max_gb > 0:
            raise UserError(f"{MAX_GB_ENV}={text!r} is invalid: expected a positive number of GB such as 50")
    if not max_gb > 0:
        raise UserError(f"--cache-max-gb {max_gb!r} is invalid: expected a positive number of GB such as 50")
    return int(max_gb * GB)


# ---------------------------------------------------------------------------------------------
# Owners: who wrote a file, and whether that process still runs


def owner() -> str:
    """``HOST-PID`` of this process (read at each call: a forked process is another owner)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def owner_alive(name: str, path: Path | None = None) -> bool:
    """Whether process ``HOST-PID`` may still be writing its file: this machine's pid exists, or another
    machine's file was written in the last 24 hours (its pid cannot be checked from here)."""
    host, _, pid = name.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        try:
            return path is None or time.time() - path.stat().st_mtime < REMOTE_STALE_SECONDS
        except OSError:
            return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, owned by another user
    return True


def live_writers(folder: Path) -> list[str]:
    """Owners of the live writers' temporary files in ``folder``."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _TEMP.fullmatch(entry.name)
            if match and owner_alive(match.group(1), Path(entry.path)):
                found.append(match.group(1))
    return found


def remove_stale(folder: Path, pattern: re.Pattern = _TEMP) -> None:
    """Delete the temporary files or folders in ``folder`` (names matching ``pattern``, whose first group is
    the owner ``HOST-PID``) left by processes of this host that died (SIGKILL, power loss)."""
    host = socket.gethostname()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = pattern.fullmatch(entry.name)
            if match and match.group(1).rpartition("-")[0] == host and not owner_alive(match.group(1)):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


_HELD: dict[Path, int] = {}  # teacher entries this process trains with -> the descriptor holding their lock


def release_in_use() -> None:
    """Drop this process's use locks: it is done with the entry it trained with."""
    for folder in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(_HELD.pop(folder))


def mark_in_use(folder: Path) -> None:
    """Hold a shared lock on a teacher entry while this process uses it (until it marks another, or ends),
    and stamp it used.

    A process trains with one entry at a time (an ablate grid runs its students one after the other),
    so marking a new entry releases the previous one. Raises FileNotFoundError if the entry was evicted
    meanwhile.
    """
    folder = Path(folder)
    release_in_use()
    fd = os.open(folder / "meta.json", os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: the entry is not protected
            fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_ino != os.stat(folder / "meta.json").st_ino:  # evicted between open and lock
            raise FileNotFoundError(f"{folder} was evicted")
    except BaseException:
        os.close(fd)
        raise
    _HELD[folder] = fd
    touch(folder)


def locked(folder: Path) -> bool:
    """Whether a live process holds the use lock of a teacher entry (this process's own included)."""
    try:
        fd = os.open(Path(folder) / "meta.json", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False  # a file system without locks
    finally:
        os.close(fd)  # drops the probe's own lock


def touch(folder: Path) -> None:
    """Stamp a teacher entry as used now (its ``meta.json`` mtime, what LRU eviction orders by)."""
    with contextlib.suppress(OSError):
        os.utime(Path(folder) / "meta.json")


# ---------------------------------------------------------------------------------------------
# Entries


@dataclass
class Entry:
    """One cache entry: a teacher entry folder, a feature file, or anything else under a kind folder."""
    kind: str
    name: str
    path: str
    bytes: int
    last_used: float  # seconds since the epoch
    views: int | None = None  # teacher entries: complete views stored
    key: dict = field(default_factory=dict)  # what it is keyed on (digests shortened)
    busy: bool = False  # a live process writes or trains with it

    def to_dict(self) -> dict:
        return {**asdict(self), "last_used_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.last_used))}


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        with contextlib.suppress(OSError):
            return path.lstat().st_size
        return 0
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _short(value) -> object:
    return value[:12] if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{16,}", value) else value


def _safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file's JSON header (what a feature entry is keyed on)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 10_000_000:
                return {}
            return json.loads(f.read(length)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error):
        return {}


def read_entry(path: Path, kind: str) -> Entry:
    """Describe one entry (a folder with ``meta.json`` or views, or a file)."""
    path = Path(path)
    meta, views = {}, None
    if path.is_dir():
        meta_file = path / "meta.json"
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(meta_file.read_text())
        if isinstance(meta, dict) and "teacher_blocks" in meta or any(path.glob("view*.tokens.npy")):
            views = len(list(path.glob("view*.tokens.npy")))
        try:
            last_used = (meta_file if meta_file.is_file() else path).stat().st_mtime
        except OSError:
            last_used = 0.0
        busy = bool(live_writers(path)) or locked(path)
    else:
        if path.suffix == ".safetensors":
            meta = _safetensors_metadata(path)
        try:
            last_used = path.stat().st_mtime
        except OSError:
            last_used = 0.0
        busy = False
    key = {}
    if isinstance(meta, dict):
        for source, name in _KEY_FIELDS:
            if source in meta and name not in key:
                key[name] = _short(meta[source])
    return Entry(kind=kind, name=path.name, path=str(path), bytes=_size(path), last_used=last_used, views=views,
                 key=key, busy=busy)


def entries_in(folder: Path, kind: str | None = None) -> list[Entry]:
    """The entries of one kind folder (hidden names are temporary or being deleted), oldest use first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [read_entry(folder / name, kind or folder.name) for name in sorted(os.listdir(folder))
             if not name.startswith(".")]
    return sorted(found, key=lambda e: e.last_used)


def _is_kind_folder(folder: Path) -> bool:
    """Whether ``folder`` holds entries itself (a ``--teacher-cache DIR`` folder) rather than kind folders."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.is_file() and entry.name.endswith(".safetensors"):
                return True
            if entry.is_dir() and (Path(entry.path) / "meta.json").is_file():
                return True
    return False


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder ``wecolora cache`` looks at: ``cache_dir`` (which must exist), else ``$WECOLORA_CACHE_DIR``,
    else ``~/.cache/wecolora``."""
    if cache_dir:
        root = Path(cache_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"--cache-dir {cache_dir} does not exist" if not root.exists()
                            else f"--cache-dir {cache_dir} is not a folder")
        return root
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def list_entries(cache_dir: str | os.PathLike | None = None) -> list[Entry]:
    """Every entry under the cache root, by kind then oldest use first.

    ``cache_dir`` may be the root (kind folders under it) or one kind's folder (as given to
    ``distill --teacher-cache DIR``).

    Example:
        >>> for e in list_entries():  # doctest: +SKIP
        ...     print(e.kind, e.name, e.bytes, e.views)
    """
    root = cache_root(cache_dir)
    if not root.is_dir():
        return []
    if _is_kind_folder(root):
        return entries_in(root)
    return [e for kind in sorted(os.listdir(root)) if not kind.startswith(".") and (root / kind).is_dir()
            for e in entries_in(root / kind)]


def evict(path: Path) -> bool:
    """Delete one entry unless a live process uses it; True if this call removed it.

    A teacher entry is locked exclusively (so no run starts using it meanwhile) and renamed out of the way
    in one atomic step (no reader finds half of it), then removed.
    """
    path = Path(path)
    if not path.is_dir():
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(path / "meta.json", os.O_RDONLY)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a run uses it
            except OSError:
                pass  # a file system without locks
        if live_writers(path):
            return False
        parking = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{_EVICTING}{path.name}."))
        try:
            os.replace(path, parking / path.name)
        except FileNotFoundError:
            return False
        finally:
            shutil.rmtree(parking, ignore_errors=True)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _remove_abandoned_evictions(folder: Path) -> None:
    """Remove what a process killed in the middle of :func:`evict` left (``.evicting-*`` folders)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.startswith(_EVICTING) and time.time() - entry.stat().st_mtime > 3600:
                shutil.rmtree(entry.path, ignore_errors=True)


def capped_folders(teacher_dir: str | os.PathLike | None = None,
                   images_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders the cap covers: the teacher cache folder and the image-store folder in use by the run.

    Each is its own setting (``--teacher-cache DIR``, ``open_store(cache_dir=...)``), else ``ROOT/teacher``
    and ``ROOT/images`` under :func:`wecolora.files.cache_folder`'s root.
    """
    return [cache_folder("teacher", teacher_dir), cache_folder("images", images_dir)]


@dataclass(frozen=True)
class CacheCap:
    """The cap a run's teacher entries and image stores share, read once per run: bytes, and the folders it covers."""
    max_bytes: int
    folders: tuple[Path, ...]

    @classmethod
    def resolve(cls, max_gb: float | None = None, teacher_dir: str | os.PathLike | None = None,
                images_dir: str | os.PathLike | None = None) -> CacheCap:
        """``--cache-max-gb`` (else ``$WECOLORA_CACHE_MAX_GB``, else 50 GB) over :func:`capped_folders`."""
        return cls(cache_cap_bytes(max_gb), tuple(capped_folders(teacher_dir, images_dir)))


def make_room(folders: list[Path], need: int, cap: int, *, keep: Path | None = None) -> bool:
    """Evict the least recently used entries under ``folders`` (teacher entries and image stores alike,
    :func:`capped_folders`) until ``need`` more bytes fit under ``cap``.

    ``keep`` (the entry the caller uses) and every entry a live process writes, trains with or reads (this
    process included) are never evicted, and nothing is evicted when ``need`` alone is over the cap.
    Returns whether the bytes fit afterwards.
    """
    if need > cap:
        return False
    found = []
    for folder in folders:
        _remove_abandoned_evictions(Path(folder))
        found += entries_in(folder)
    total = sum(e.bytes for e in found)
    for entry in sorted(found, key=lambda e: e.last_used):  # oldest use first
        if total + need <= cap:
            break
        if entry.busy or Path(entry.path) == keep:
            continue
        if evict(Path(entry.path)):
            _logger.info("cache: evicted %s (%s, last used %s) to stay under the %s cap", entry.path,
                         format_bytes(entry.bytes), time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)),
                         format_bytes(cap))
            total -= entry.bytes
    return total + need <= cap


def clear_entries(cache_dir: str | os.PathLike | None = None, *, older_than_days: float | None = None,
                  everything: bool = False) -> tuple[list[Entry], list[Entry]]:
    """Delete the entries last used more than ``older_than_days`` days ago, or every entry (``everything``).

    Entries a live process writes or trains with are kept. Returns ``(removed, kept_busy)``.
    """
    if everything == (older_than_days is not None):
        raise UserError("give --all or --older-than DAYS (one of them) to say which entries to delete")
    if older_than_days is not None and not older_than_days >= 0:
        raise UserError(f"--older-than {older_than_days!r} is invalid: expected a number of days >= 0")
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else float("inf")
    removed, busy = [], []
    for entry in list_entries(cache_dir):
        if entry.last_used >= cutoff:
            continue
        if not entry.busy and evict(Path(entry.path)):
            removed.append(entry)
        elif Path(entry.path).exists():
            busy.append(entry)
    return removed, busy


def format_bytes(n: float) -> str:
    """A byte count in decimal units.

    >>> format_bytes(0), format_bytes(1536), format_bytes(5.8e9)
    ('0 B', '1.5 kB', '5.8 GB')
    """
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_age(seconds: float) -> str:
    """How long ago, in the largest whole unit.

    >>> format_age(30), format_age(7200), format_age(3 * 86400)
    ('just now', '2 h ago', '3 d ago')
    """
    if seconds < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit} ago"
    return "just now"
