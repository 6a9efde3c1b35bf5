"""A run's output folder: the checks of what it holds (pure, standard library only) and :class:`RunFolder`,
the one skeleton both training loops (distill, pretrain) write it through.

The checks only read: the API runs them before torch is imported, so a wrong path fails in a fraction of a
second. Claiming a folder (:meth:`RunFolder.claim`) is the one step that changes it before the run writes:
it locks the folder against a second run, puts back what a kill in the middle of a folder swap parked,
checks its state again and drops stale temporaries.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked against each other
    fcntl = None

from wecolora.cache.admin import cache_cap_bytes
from wecolora.data.layout import check_dataset
from wecolora.errors import UserError
from wecolora.files import atomic_write_text, check_writable, csv_text, recover_folder
from wecolora.teachers.specs import check_model_spec, check_weights_file

_logger = logging.getLogger(__name__)

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "state.json")  # weights, optimizer, state (checkpoint.py)
DISTILL_FINISHED = "adapter/wecolora.json"  # exists only once a distillation has completed (export.RUN_INFO)
PRETRAIN_FINISHED = "model/config.json"  # exists only once a pretraining has completed
LOCK_FILE = ".wecolora-run.lock"  # inside the run folder while a run holds it: "pid PID on HOST"


def main_process() -> bool:
    """Under torchrun, only the first process locks, repairs and cleans a run folder."""
    return os.environ.get("RANK", "0") == "0"


def after_repair(output: Path, relative: str) -> Path:
    """Where ``output/relative`` will be once the folder is repaired (:func:`wecolora.files.recover_folder`):
    a parked ``.NAME.old`` whose replacement never arrived stands for ``NAME``."""
    first, *rest = Path(relative).parts
    top, parked = output / first, output / f".{first}.old"
    if not top.exists() and parked.exists():
        top = parked
    return top.joinpath(*rest)


def check_run_folder(output: str | Path, *, finished: str, overwrite: bool, resume: str | None,
                     option: str = "--output") -> Path:
    """Refuse to clobber a finished or interrupted run unless asked to (``--overwrite``/``--resume``).

    Only reads: a folder a kill left mid-swap is judged as it will be once :meth:`RunFolder.claim` repairs it.

    Args:
        finished: the file (relative to ``output``) that exists only once a run has completed.
        resume: ``None``, ``auto`` (``output/checkpoint`` if present, else a fresh start) or a checkpoint folder.
    """
    out = check_writable(output, option)
    is_finished = after_repair(out, finished).is_file()
    interrupted = after_repair(out, "checkpoint").is_dir()
    if is_finished and interrupted and not overwrite:
        raise UserError(f"{output} holds a finished run and an interrupted --overwrite of it; pass --overwrite "
                        f"--resume auto to continue the new run or --overwrite alone to restart it")
    if is_finished and not overwrite:
        raise UserError(f"{output} already holds a finished run; pass --overwrite to redo it or choose another "
                        f"{option}")
    if interrupted and not (overwrite or resume):
        raise UserError(f"{output} holds an interrupted run; pass --resume auto to continue it or --overwrite to "
                        f"restart")
    if resume not in (None, "auto"):
        folder = Path(resume).expanduser()
        if not folder.is_dir():
            raise UserError(f"--resume {resume} is not a checkpoint folder (or use --resume auto)")
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        if missing:
            raise UserError(f"--resume {resume} is not a complete wecolora checkpoint: {', '.join(missing)} missing")
    return out


# Settings a resumed run may change: where and how it runs, not what it computes. The batch split may
# change with the number of processes (the schedule adapts, see engine.resume_schedule).
EXECUTION_SETTINGS = {"output", "resume", "overwrite", "device", "num_workers", "precision", "compile",
                      "teacher_cache", "teacher_cache_dir", "cache_max_gb"}  # how a run executes, not what it computes


RESUME_MAY_CHANGE = EXECUTION_SETTINGS | {"batch_size", "accum_steps"}


def check_distill(config) -> Path:
    """Every path-level check of a :class:`~wecolora.config.DistillConfig`; returns the output folder. Pure."""
    check_distill_inputs(config)
    output = check_run_folder(config.output, finished=DISTILL_FINISHED, overwrite=config.overwrite,
                              resume=config.resume)
    check_distill_resume(config, output)
    return output


def check_distill_inputs(config) -> None:
    """What a distillation reads: the teacher, its weights file, the dataset."""
    check_model_spec(config.teacher)
    check_weights_file(config.teacher_weights)
    check_dataset(config.data, ("train",))


def check_distill_resume(config, output: Path) -> None:
    """A resumed distillation keeps the settings it started with; the teacher cache's cap is valid."""
    if config.resume == "auto" and after_repair(output, "checkpoint").is_dir():
        check_same_settings(config, output / "config.yaml")
    if config.uses_teacher_cache():
        cache_cap_bytes(config.cache_max_gb)  # $WECOLORA_CACHE_MAX_GB is read, and checked, here first


def claim_distill(config):
    """:func:`check_distill`'s checks with ``config.output`` claimed (:meth:`RunFolder.claim`): a context
    manager giving the :class:`RunFolder`."""
    check_distill_inputs(config)
    return RunFolder.claim(config.output, finished=DISTILL_FINISHED, overwrite=config.overwrite,
                           resume=config.resume, check=lambda output: check_distill_resume(config, output))


def check_same_settings(config, saved: Path) -> None:
    """Refuse to resume a run with settings that change what it computes (another ratio, seed, mode...)."""
    changed = changed_settings(config, saved)
    if changed:
        raise UserError(f"cannot resume {saved.parent} with other settings ({changed}); resume with the settings "
                        f"in {saved}, or pass --overwrite to start again")


def changed_settings(config, saved: Path, ignore=None) -> str:
    """The settings of ``config`` that differ from a run's saved ``config.yaml``, as ``--key old -> new`` text
    (empty when none does); ``ignore`` (default: what a resume may change) names settings left out."""
    import dataclasses

    import yaml

    if not saved.is_file():
        return ""
    before = (yaml.safe_load(saved.read_text()) or {}).get("settings", {})
    now = dataclasses.asdict(config)

    def same(a, b) -> bool:  # one folder given two ways is the same setting
        if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    ignore = RESUME_MAY_CHANGE if ignore is None else ignore
    changed = [k for k in now if k not in ignore and k in before and not same(before[k], now[k])]
    return ", ".join(f"--{k.replace('_', '-')} {before[k]!r} -> {now[k]!r}" for k in changed)


def check_pretrain(config) -> Path:
    """Every path-level check of a :class:`~wecolora.config.PretrainConfig`; returns the output folder. Pure."""
    check_dataset(config.data, ("train", "test"))
    return check_run_folder(config.output, finished=PRETRAIN_FINISHED, overwrite=config.overwrite,
                            resume=config.resume)


def claim_pretrain(config):
    """:func:`check_pretrain`'s checks with ``config.output`` claimed (:meth:`RunFolder.claim`)."""
    check_dataset(config.data, ("train", "test"))
    return RunFolder.claim(config.output, finished=PRETRAIN_FINISHED, overwrite=config.overwrite,
                           resume=config.resume)


class RunFolder:
    """A claimed run folder: what both training loops write, and where.

    ``config.yaml`` (first), ``summary.csv`` and ``checkpoint/`` after every epoch, then the run's result
    (written by the loop) and the checkpoint removed (:meth:`finish`). Get one from :meth:`claim`.

    Attributes:
        path: the folder.
        checkpoint: ``path/checkpoint``, where each epoch's checkpoint goes.
        resume_from: the checkpoint this run continues from (``--resume``: ``auto`` is ``checkpoint`` if there
            is one), or None for a fresh start.
    """

    def __init__(self, path: Path, resume: str | None):
        self.path = path
        self.checkpoint = path / "checkpoint"
        if resume == "auto":  # another torchrun process may see it parked, before the first one puts it back
            self.resume_from = self.checkpoint if after_repair(path, "checkpoint").is_dir() else None
        else:
            self.resume_from = Path(resume).expanduser() if resume else None  # checked: a checkpoint folder

    @classmethod
    @contextlib.contextmanager
    def claim(cls, output: str | Path, *, finished: str, overwrite: bool, resume: str | None, check=None,
              option: str = "--output"):
        """Hold ``output`` for one run, as a context manager giving its :class:`RunFolder`.

        In order: the folder must be writable; it is created if needed and locked (another run holding it is
        refused with one line); a kill's leftovers are repaired; its state is checked (:func:`check_run_folder`,
        then ``check(path)`` if given); stale temporaries are dropped. On leaving, the lock is released (a
        killed process's lock goes with it), and a folder this claim created is removed again if the run wrote
        nothing into it. Under torchrun only the first process creates, locks and repairs; the others check.
        """
        out = check_writable(output, option)
        main = main_process()
        created = _make_folders(out) if main else []
        lock = None
        try:
            if main:
                lock = _lock(out, output, option)
                recover_folder(out, clean=False)  # a kill in the middle of a folder swap: put the earlier folder back
            check_run_folder(out, finished=finished, overwrite=overwrite, resume=resume, option=option)
            if check is not None:
                check(out)
            if main:
                recover_folder(out)  # the run goes ahead: drop what killed runs left half-written
            yield cls(out, resume)
        except BaseException:
            _unlock(out, lock)
            for folder in created:  # deepest first; one the run wrote into stays (rmdir refuses)
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise
        _unlock(out, lock)

    def write_config(self, text: str) -> None:
        """Write ``config.yaml``, the run's first write. A fresh start first drops the checkpoint an earlier
        run left (an ``--overwrite`` of an interrupted run): it belongs to other settings."""
        if self.resume_from is None:
            shutil.rmtree(self.checkpoint, ignore_errors=True)
        atomic_write_text(self.path / "config.yaml", text)

    def write_summary(self, rows: list[dict], columns) -> None:
        """Write ``summary.csv``: one row per finished epoch."""
        atomic_write_text(self.path / "summary.csv", csv_text(rows, columns))

    def finish(self) -> None:
        """The run's result is written: its checkpoint is no longer needed."""
        shutil.rmtree(self.checkpoint, ignore_errors=True)


def _make_folders(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; returns the ones made here, deepest first."""
    missing = []
    folder = out
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            continue
        made.append(folder)
    return made[::-1]


def _lock(out: Path, output, option: str) -> int | None:
    """An exclusive lock on ``out``'s lock file, as an open descriptor (None where locks are unavailable)."""
    if fcntl is None:
        return None
    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # a refused run removed the folder it had made as we opened its lock file
            out.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{output} is in use by another wecolora run{f' ({holder})' if holder else ''}; wait "
                            f"for it to finish or choose another {option}") from None
        except OSError as err:  # a file system without locks (some network mounts)
            os.close(fd)
            _logger.warning("cannot lock %s (%s): another run could write into it at the same time", out, err)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder finished and removed the file as we opened it: lock the current one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def _unlock(out: Path, fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(out / LOCK_FILE)  # still held: no other run can have taken it
    os.close(fd)
