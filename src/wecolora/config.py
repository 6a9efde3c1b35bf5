"""Run settings as dataclasses: validated once, saved as the run's ``config.yaml``.

Precedence: dataclass defaults < ``--config FILE.yaml`` < command-line flags. This module does not
import torch so that ``wecolora --help`` stays instant.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError

MODE_NAMES = ("wecolora", "lora-qv", "weco-kd", "scratch-kd")  # registry: student.MODES
LOSS_NAMES = ("l1", "mse")  # registry: losses.LOSSES
MATCH_NAMES = ("last", "last-norm", "per-block")  # registry: losses.MATCHES
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise UserError(f"--{name.replace('_', '-')} {value!r} is invalid: expected {expected}")


@dataclass
class DistillConfig:
    """Everything a ``wecolora distill`` run depends on (the paper's recipe by default)."""
    teacher: str
    data: str
    output: str
    teacher_weights: str | None = None
    img_size: int | None = None
    # student
    mode: str = "wecolora"
    reduction: int = 2
    keep: str = "first"  # first | last | comma-separated teacher block indices
    rank: int | None = None  # default: 128, or width/4 for narrow teachers
    lora_alpha: float | None = None  # default: rank (scale 1, as in the paper)
    lora_dropout: float = 0.0
    dora: bool = False
    rslora: bool = False
    # objective
    loss: str = "l1"
    match: str = "last"  # last: last block before the final norm; last-norm: after it; per-block
    # few-shot subset
    ratio: float | None = 0.01
    per_class: int | None = None  # overrides ratio
    min_per_class: int = 1
    subset_seed: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    accum_steps: int = 8
    blr: float = 1e-3
    lr: float | None = None  # absolute peak lr; default blr * effective_batch / 256
    warmup_epochs: int = 2
    weight_decay: float = 0.05
    seed: int = 0
    precision: str | None = None  # default: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    num_workers: int | None = None  # default: min(8, CPU count)
    # speed
    teacher_cache: bool = True  # store the teacher's tokens per (image, view) on disk and reuse them
    teacher_cache_dir: str | None = None  # default: $WECOLORA_CACHE_DIR/teacher, else ~/.cache/wecolora/teacher
    cache_views: int | None = None  # K augmented views per image, epoch e shows view e mod K (default: epochs)
    compile: bool = False  # torch.compile the student's training forward
    resume: str | None = None  # auto | PATH of a checkpoint folder
    overwrite: bool = False

    def __post_init__(self):
        _check(self.mode in MODE_NAMES, "mode", self.mode, f"one of {', '.join(MODE_NAMES)}")
        _check(self.loss in LOSS_NAMES, "loss", self.loss, f"one of {', '.join(LOSS_NAMES)}")
        _check(self.match in MATCH_NAMES, "match", self.match, f"one of {', '.join(MATCH_NAMES)}")
        _check(self.precision in (None, *PRECISIONS), "precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        _check(self.device in DEVICES, "device", self.device, f"one of {', '.join(DEVICES)}")
        _check(isinstance(self.reduction, int) and self.reduction >= 1, "reduction", self.reduction, "an integer >= 1")
        self.keep_blocks()  # validates the keep spec
        _check(self.rank is None or self.rank >= 1, "rank", self.rank, "an integer >= 1")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "a value in [0, 1)")
        if self.per_class is None:
            _check(self.ratio is not None and 0.0 < self.ratio <= 1.0, "ratio", self.ratio, "a fraction in (0, 1]")
        else:
            _check(self.per_class >= 1, "per_class", self.per_class, "an integer >= 1")
        _check(self.min_per_class >= 0, "min_per_class", self.min_per_class, "an integer >= 0")
        _check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _check(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", self.warmup_epochs, f"0 <= warmup < epochs ({self.epochs})")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.accum_steps >= 1, "accum_steps", self.accum_steps, "an integer >= 1")
        _check(self.blr > 0, "blr", self.blr, "a positive number")
        _check(self.lr is None or self.lr > 0, "lr", self.lr, "a positive number")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(self.num_workers is None or self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        _check(self.cache_views is None or self.cache_views >= 1, "cache_views", self.cache_views, "an integer >= 1")

    def keep_blocks(self) -> str | list[int]:
        """``first``/``last`` or the explicit list of teacher blocks named by ``keep``."""
        if self.keep in ("first", "last"):
            return self.keep
        try:
            return [int(b) for b in str(self.keep).split(",")]
        except ValueError:
            raise UserError(f"--keep {self.keep!r} is invalid: expected first, last or block indices like 0,4,8") from None

    def peak_lr(self, world_size: int = 1) -> float:
        """Absolute lr: ``--lr`` if given, else the linear scaling rule blr * effective_batch / 256."""
        return self.lr if self.lr is not None else self.blr * self.effective_batch(world_size) / 256

    def effective_batch(self, world_size: int = 1) -> int:
        return self.batch_size * self.accum_steps * world_size


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of settings")
    return values.get("settings", values)  # a run's own config.yaml holds settings + resolved


def build_config(cls, config_file: str | None = None, **flags):
    """Instantiate ``cls`` from defaults < YAML file < flags (flags that are None are unset)."""
    values = load_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise UserError(f"missing required setting(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return cls(**values)


def to_yaml(config, **resolved) -> str:
    """The run's ``config.yaml``: every setting, then the values derived from them at run time."""
    return yaml.safe_dump({"settings": dataclasses.asdict(config), "resolved": resolved}, sort_keys=False)
