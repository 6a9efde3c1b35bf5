"""Checks of what the user gave (paths, folders, run states), done before any model or image is read.

Standard library only, so that ``wecolora distill --data /wrong/path`` fails in a fraction of a second
without importing torch. Every check raises :class:`UserError` naming the value and the fix. The
checks that need the teacher's architecture (reduction vs depth, rank vs width, image size vs patch)
run on a weightless copy of it in :func:`wecolora.vit.load_model`'s callers.
"""
from __future__ import annotations

import os
from pathlib import Path

from .cache_admin import cache_cap_bytes
from .errors import UserError
from .files import recover_folder
from .hf_transformers import check_folder, transformers_folder

BUILTIN_DATASET_NAMES = ("fashion-mnist", "mnist-5k")  # keys of data.BUILTIN_DATASETS (data imports torch)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "state.json")  # weights, optimizer, state (checkpoint.py)
# The teachers shipped with the package (timm folders; see each folder's RECIPE.md): the supervised
# Fashion-MNIST ViT and the self-supervised (MAE) one.
BUNDLED_TEACHERS = {"bundled": Path(__file__).parent / "assets" / "teacher",
                    "bundled-mae": Path(__file__).parent / "assets" / "teacher-mae"}
BUNDLED_HOW = {"bundled": "wecolora pretrain --data fashion-mnist",
               "bundled-mae": "wecolora pretrain --objective mae --data fashion-mnist"}


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


def bundled_teacher(spec: str) -> Path:
    """The folder of a bundled teacher (``bundled``, ``bundled-mae``), refused in one line when not installed."""
    folder = BUNDLED_TEACHERS[spec]
    if not (folder / "config.json").is_file():
        raise UserError(f"the {spec} teacher is not in this install ({folder} has no config.json); train one with "
                        f"`{BUNDLED_HOW[spec]} --output DIR` and pass DIR, or use another teacher")
    return folder


def check_model_spec(spec: str, option: str = "--teacher") -> None:
    """Folders named by a model spec exist and hold a ``config.json``; names are left to timm.

    A transformers folder (``config.json`` with a ``model_type``) must be one that converts to a timm ViT.
    """
    if not spec:
        raise UserError(f"{option} is empty; give a timm model name, a folder, local-dir:FOLDER, hf-hub:ORG/NAME, "
                        f"hf-transformers:FOLDER, bundled or bundled-mae")
    if spec in BUNDLED_TEACHERS:
        bundled_teacher(spec)
        return
    if spec.startswith("hf-hub:"):
        return
    folder = transformers_folder(spec)
    if folder is not None:
        check_folder(folder, option)
        return
    if spec.startswith("local-dir:"):
        folder = Path(spec.partition(":")[2]).expanduser()
        if not folder.is_dir():
            raise UserError(f"{option} {spec}: model folder {folder} does not exist")
        if not (folder / "config.json").is_file():
            raise UserError(f"{option} {spec}: {folder} has no config.json; give a timm model folder "
                            f"(saved with timm's save_for_hf)")
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{option} {spec} is a file; pass weights with --teacher-weights and an architecture "
                            f"name with {option}")
        if not any((path / sub / "config.json").is_file() for sub in ("student", "model", ".")):
            raise UserError(f"{option} {spec} is a folder without config.json: give a timm model folder, a run "
                            f"folder or a model name")
    elif "/" in spec or spec.startswith((".", "~")):
        raise UserError(f"{option} {spec}: no such folder (timm model names hold no '/')")


def check_weights_file(path: str | None, option: str = "--teacher-weights") -> None:
    if path is None:
        return
    file = Path(path).expanduser()
    if not file.exists():
        raise UserError(f"{option} {path} does not exist")
    if not file.is_file():
        raise UserError(f"{option} {path} is not a file")
    if not file.name.lower().endswith(WEIGHT_SUFFIXES):
        raise UserError(f"{option} {path}: unknown weights format; expected one of {', '.join(WEIGHT_SUFFIXES)}")


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
    check_dataset(config.data, ("train",))
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
    """Every path-level check of a :class:`~wecolora.pretrain.PretrainConfig`; returns the output folder."""
    check_dataset(config.data, ("train", "test"))
    return check_run_folder(config.output, finished="model/config.json", overwrite=config.overwrite,
                            resume=config.resume)


def check_evaluation(model: str, data: str, output: str) -> Path:
    """Path-level checks of ``probe``/``knn``: the model spec, a dataset with both splits, the output."""
    check_model_spec(model, "--model")
    check_dataset(data, ("train", "test"))
    return check_writable(output)


def check_ablation(grid, output: str) -> Path:
    """Path-level checks of an :class:`~wecolora.ablate.Ablation` grid: teacher, datasets, output."""
    check_model_spec(grid.teacher)
    check_dataset(grid.distill_data, ("train",))
    for data in grid.probe_data:
        check_dataset(data, ("train", "test"), "--probe-data")
    return check_writable(output)
