"""TODO docstring"""
from __future__ import annotations

import os
from pathlib import Path

from wecolora.cache.admin import cache_cap_bytes
from wecolora.data.layout import check_dataset
from wecolora.errors import UserError
from wecolora.files import check_writable, recover_folder
from wecolora.teachers.specs import check_model_spec, check_weights_file

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "state.json")  # weights, optimizer, state (checkpoint.py)


def check_run_folder(output: str | Path, *, finished: str, overwrite: bool, resume: str | None,
                     option: str = "--output") -> Path:
    """Refuse to clobber a finished or interrupted run unless asked to (``--overwrite``/``--resume``).

    Args:
        finished: the file (relative to ``output``) that exists only once a run has completed.
        resume: ``None``, ``auto`` (``output/checkpoint`` if present, else a fresh start) or a checkpoint folder.
    """
    out = check_writable(output, option)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, only the first process repairs or cleans
    if main_process:
        recover_folder(out, clean=False)  # a kill in the middle of a folder swap: put the earlier folder back
    is_finished = (out / finished).is_file()
    interrupted = (out / "checkpoint").is_dir()
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
    if main_process:
        recover_folder(out)  # the run goes ahead: drop what killed runs left half-written
    return out


# Settings a resumed run may change: where and how it runs, not what it computes. The batch split may
# change with the number of processes (the schedule adapts, see engine.resume_schedule).
EXECUTION_SETTINGS = {"output", "resume", "overwrite", "device", "num_workers", "precision", "compile",
                      "teacher_cache", "teacher_cache_dir", "cache_max_gb"}  # how a run executes, not what it computes


RESUME_MAY_CHANGE = EXECUTION_SETTINGS | {"batch_size", "accum_steps"}


def check_distill(config) -> Path:
    """Every path-level check of a :class:`~wecolora.config.DistillConfig`; returns the output folder."""
    check_model_spec(config.teacher)
    check_weights_file(config.teacher_weights)
    check_dataset(config.data, ("train",), **config.source_options())
    output = check_run_folder(config.output, finished="adapter/wecolora.json", overwrite=config.overwrite,
                              resume=config.resume)
    if config.resume == "auto" and (output / "checkpoint").is_dir():
        check_same_settings(config, output / "config.yaml")
    if config.uses_teacher_cache():
        cache_cap_bytes(config.cache_max_gb)  # $WECOLORA_CACHE_MAX_GB is read, and checked, here first
    return output


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
    """Every path-level check of a :class:`~wecolora.pretrain.PretrainConfig`; returns the output folder.

    The supervised objective needs labels and a test split; MAE needs neither (its kNN monitor runs when the
    source has both)."""
    supervised = config.objective == "supervised"
    check_dataset(config.data, ("train", "test") if supervised else ("train",), need_labels=supervised,
                  **config.source_options())
    return check_run_folder(config.output, finished="model/config.json", overwrite=config.overwrite,
                            resume=config.resume)
