"""Run settings as dataclasses: validated once, saved as the run's ``config.yaml``.

Precedence: dataclass defaults < ``--config FILE.yaml`` < command-line flags. This module does not
import torch so that ``wecolora --help`` stays instant.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from wecolora.errors import UserError

_logger = logging.getLogger(__name__)

MODE_NAMES = ("wecolora", "lora-qv", "weco-kd", "scratch-kd")  # registry: method.plan.MODES (tests/test_layers.py checks they agree)
LOSS_NAMES = ("l1", "mse")  # registry: method.losses.LOSSES
MATCH_NAMES = ("last", "last-norm", "per-block")  # registry: method.losses.MATCHES
KEEP_RULES = ("first", "last")  # fixed positions (method.blocks.select_blocks)
KEEP_SEARCHES = ("auto", "greedy", "influence")  # chosen from images (method.block_search.choose_blocks)
KEEP_NAMES = KEEP_RULES + KEEP_SEARCHES  # the one keep vocabulary
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_REDUCTION = 2  # the paper's r: every API and command defaults to it
DEVICES = ("auto", "cpu", "cuda")
PROBE_PROTOCOLS = ("cached", "mae")
PROBE_OPTIMIZERS = ("lars", "sgd")  # lars: MAE's rule (trust ratio on >1-D params); sgd: momentum SGD (0.1.0)
POOLINGS = ("cls", "mean")
PROBE_TASKS = ("classification", "segmentation")  # segmentation: a 1x1 head on the patch tokens (evaluation.segmentation)
CACHE_POLICIES = ("auto", "on", "off")  # teacher cache; auto: on in an ablate grid or with --teacher-cache DIR
SUBSET_RULES = ("per-class", "random", "coreset")  # how the few-shot subset is drawn (data.subset)
CORESET_METHODS = ("kcenter", "kmeans++")  # coreset picks from the teacher's features (data.subset)
FOLDER_LAYOUTS = ("auto", "classes", "unlabeled")  # how a folder of images is read (data.layout)
PAPER_WARMUP_EPOCHS = 2
DEFAULT_PLAN_BATCH = 32  # images per timed call of the planner (bench.planner)
WIDTH_RANKINGS = ("activation", "uniform")  # how a narrower student's channels, heads, neurons are chosen (method.width)
WIDTH_LOSSES = ("kept", "projection")  # narrower student: teacher tokens on the kept channels | a learned projection
BUDGETS = ("speedup", "latency_ms", "params")  # what a shape budget can bound (bench.planner)
RUNTIMES = ("torch", "onnxruntime")  # what the planner times
WIDTH_FIELDS = ("embed_dim", "heads", "mlp_hidden", "width_ratio")


def parse_keep(keep) -> str | list[int]:
    """The one reading of ``--keep``: a name of :data:`KEEP_NAMES`, or teacher block indices ("0,3,7" or a list).

    >>> parse_keep("auto"), parse_keep("0, 3,7"), parse_keep([0, 3])
    ('auto', [0, 3, 7], [0, 3])

    A list that names a block twice is refused (``0,0,1,2,3,4`` would otherwise train 5 blocks, not 6).
    """
    if isinstance(keep, str) and keep.strip() in KEEP_NAMES:
        return keep.strip()
    items = keep.split(",") if isinstance(keep, str) else [keep] if isinstance(keep, int) else keep
    try:
        blocks = [int(str(b).strip()) for b in items]
    except (TypeError, ValueError):
        blocks = []
    if not blocks:
        raise UserError(f"--keep {keep!r} is invalid: expected one of {', '.join(KEEP_NAMES)} or teacher block "
                        f"indices like 0,4,8")
    repeated = sorted({b for b in blocks if blocks.count(b) > 1})
    if repeated:
        raise UserError(f"--keep {','.join(map(str, blocks))} names block(s) {', '.join(map(str, repeated))} more than "
                        f"once: a block is kept once, so list each index once (e.g. "
                        f"{','.join(map(str, sorted(set(blocks))))})")
    return blocks


def check_budget(settings, *, allow_widths: bool = False) -> None:
    """At most one of :data:`BUDGETS`, each positive; with ``allow_widths=False`` none beside explicit widths
    (the budget chooses them). ``settings`` is any object with those attributes (DistillConfig, PlanConfig)."""
    given = [name for name in BUDGETS if getattr(settings, name, None) is not None]
    for name in given:
        value = getattr(settings, name)
        check_setting(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, name, value,
                      "a positive number")
    if len(given) > 1:
        raise UserError(f"give one budget, not {' and '.join('--' + g.replace('_', '-') for g in given)}")
    widths = [name for name in WIDTH_FIELDS if getattr(settings, name, None) is not None]
    if given and widths and not allow_widths:
        raise UserError(f"--{given[0].replace('_', '-')} chooses the student's shape, so it cannot be combined with "
                        f"{', '.join('--' + w.replace('_', '-') for w in widths)}: give the budget or the widths")


def check_setting(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise UserError(f"--{name.replace('_', '-')} {value!r} is invalid: expected {expected}")


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def resolve_warmup(warmup_epochs: int | None, epochs: int, default: int) -> int:
    """Warmup epochs of a run: the given value, or ``default`` capped to leave at least one epoch of decay.

    A default that does not fit a short run is shortened, not an error: the user never asked for it.
    A value the user gave that does not fit is refused with what would.
    """
    if warmup_epochs is None:
        resolved = min(default, epochs - 1)
        if resolved < default:  # said only when it differs from the recipe (config.yaml records it always)
            _logger.info("warmup shortened to %s to fit %s", _epochs(resolved), _epochs(epochs))
        return resolved
    check_setting(isinstance(warmup_epochs, int) and warmup_epochs >= 0, "warmup_epochs", warmup_epochs, "an integer >= 0")
    if warmup_epochs >= epochs:
        raise UserError(f"--warmup-epochs {warmup_epochs} does not fit --epochs {epochs}: the warmup must end before "
                        f"the last epoch; give --warmup-epochs {epochs - 1} or less, more --epochs, or leave "
                        f"--warmup-epochs out (default {default}, shortened to fit the run)")
    return warmup_epochs


@dataclass(kw_only=True)
class SourceSettings:
    """How ``--data`` is read (:mod:`wecolora.data.layout`): shared by distill, pretrain, probe and knn.

    Keyword-only, so that the settings classes keep their positional fields first.
    """
    folder_layout: str = "auto"  # a folder: auto (flat: unlabeled, sub-folders: classes, said in the log) | classes | unlabeled
    image_column: str | None = None  # a csv's path column or a datasets/parquet image column (default: found by name/type)
    label_column: str | None = None  # a csv/datasets label column, or several 0/1 columns "A,B,C" (multi-label)

    def __post_init__(self):
        check_setting(self.folder_layout in FOLDER_LAYOUTS, "folder_layout", self.folder_layout,
                      f"one of {', '.join(FOLDER_LAYOUTS)}")
        for name in ("image_column", "label_column"):
            value = getattr(self, name)
            check_setting(value is None or (isinstance(value, str) and value.strip() != ""), name, value,
                          "a column name")

    def source_options(self) -> dict:
        """The keywords :func:`wecolora.data.datasets.open_dataset` and :func:`~wecolora.data.layout.check_dataset` take."""
        return {"folder_layout": self.folder_layout, "image_column": self.image_column,
                "label_column": self.label_column}


@dataclass
class DistillConfig(SourceSettings):
    """Everything a ``wecolora distill`` run depends on (the paper's recipe by default)."""
    teacher: str
    data: str
    output: str
    teacher_weights: str | None = None
    img_size: int | None = None
    # student
    mode: str = "wecolora"
    reduction: int = DEFAULT_REDUCTION
    keep: str = "first"  # first | last | auto | greedy | influence | comma-separated teacher block indices
    keep_images: int = 384  # subset images that choose the blocks (auto/greedy/influence: 2/3 search, 1/3 score)
    # and rank the width (activation)
    rank: int | None = None  # default: 128, or width/4 for narrow teachers (the student's width)
    # student width (method.width): each given axis narrows, the others stay the teacher's
    embed_dim: int | None = None  # residual channels: a multiple of the teacher's head size (whole heads are kept)
    heads: int | None = None  # attention heads (embed_dim = heads x the teacher's head size)
    mlp_hidden: int | None = None  # MLP hidden neurons per block
    width_ratio: float | None = None  # instead of the three: round(w x heads) heads and round(w x hidden) neurons
    width_ranking: str = "activation"  # activation (Minitron's, on keep_images subset images) | uniform (Weight Selection's)
    width_loss: str = "kept"  # narrower student: kept = the teacher's tokens on the kept channels; projection = a
    # learned Linear(student width -> teacher width) on the student's tokens, trained with it and dropped at export
    # shape budget (bench.planner, resolved by wecolora.api.distill into reduction and widths before the run)
    speedup: float | None = None  # at least this many times the teacher's measured speed
    latency_ms: float | None = None  # at most this latency per batch
    params: float | None = None  # at most this many parameters
    budget_device: str = "auto"  # where the budget's latency is measured (auto: the run's device)
    budget_runtime: str = "torch"  # torch | onnxruntime
    budget_batch_size: int = DEFAULT_PLAN_BATCH  # images per timed call
    lora_alpha: float | None = None  # default: rank (scale 1, as in the paper)
    lora_dropout: float = 0.0
    dora: bool = False
    rslora: bool = False
    # objective
    loss: str = "l1"
    match: str = "last"  # last: last block before the final norm; last-norm: after it; per-block
    # few-shot subset
    subset: str | None = None  # per-class | random | coreset; default: per-class when the source has labels, else random
    ratio: float | None = 0.01  # per-class: of each class; random/coreset: of the whole source
    images: int | None = None  # a number of images in all instead of ratio (per-class: shared in proportion to the classes)
    per_class: int | None = None  # per-class only: images per class, overrides ratio
    coreset_pool: int = 10_000  # coreset: candidates drawn uniformly (seeded) whose teacher features are compared
    coreset_method: str = "kcenter"  # coreset: kcenter (farthest point) | kmeans++ (D^2 sampling)
    min_per_class: int = 1
    max_unreadable: float = 0.05  # fraction of the chosen images that may be unreadable (skipped) before a run stops
    subset_seed: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    accum_steps: int = 8
    blr: float = 1e-3
    lr: float | None = None  # absolute peak lr; default blr * effective_batch / 256
    warmup_epochs: int | None = None  # default: the paper's 2, shortened to fit a run of fewer than 3 epochs
    weight_decay: float = 0.05
    seed: int = 0
    precision: str | None = None  # default: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    num_workers: int | None = None  # default: min(8, CPU count)
    # speed
    # teacher cache: store the teacher's tokens per (image, view) on disk for later epochs, students and reruns.
    # auto: on where they are read back (an ablate grid, or a folder given in teacher_cache_dir), else off;
    # True/False (configs of wecolora 0.2) read as on/off.
    teacher_cache: str = "auto"
    teacher_cache_dir: str | None = None  # default: $WECOLORA_CACHE_DIR/teacher, else ~/.cache/wecolora/teacher
    cache_max_gb: float | None = None  # cap of the teacher cache and image stores together; default $WECOLORA_CACHE_MAX_GB, else 50
    cache_views: int | None = None  # K augmented views per image, epoch e shows view e mod K (default: epochs)
    compile: bool | None = None  # torch.compile the student's training step; None: training.compile_by_default
    resume: str | None = None  # auto | PATH of a checkpoint folder
    overwrite: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_setting(self.mode in MODE_NAMES, "mode", self.mode, f"one of {', '.join(MODE_NAMES)}")
        check_setting(self.loss in LOSS_NAMES, "loss", self.loss, f"one of {', '.join(LOSS_NAMES)}")
        check_setting(self.match in MATCH_NAMES, "match", self.match, f"one of {', '.join(MATCH_NAMES)}")
        check_setting(self.precision in (None, *PRECISIONS), "precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        check_setting(self.device in DEVICES, "device", self.device, f"one of {', '.join(DEVICES)}")
        check_setting(isinstance(self.reduction, int) and self.reduction >= 1, "reduction", self.reduction, "an integer >= 1")
        parse_keep(self.keep)  # validates the keep spec; student.plan_student resolves it
        for name in ("embed_dim", "heads", "mlp_hidden"):
            value = getattr(self, name)
            check_setting(value is None or (isinstance(value, int) and value >= 1), name, value,
                          "a positive integer (a multiple of the teacher's head size for --embed-dim)")
        check_setting(self.width_ratio is None or 0 < self.width_ratio <= 1, "width_ratio", self.width_ratio,
                      "a fraction in (0, 1]")
        if self.width_ratio is not None and any(getattr(self, n) is not None for n in ("embed_dim", "heads", "mlp_hidden")):
            raise UserError(f"--width-ratio {self.width_ratio:g} cannot be combined with --embed-dim, --heads or "
                            f"--mlp-hidden: give the ratio alone or the widths alone")
        check_setting(self.width_ranking in WIDTH_RANKINGS, "width_ranking", self.width_ranking,
                      f"one of {', '.join(WIDTH_RANKINGS)}")
        check_setting(self.width_loss in WIDTH_LOSSES, "width_loss", self.width_loss, f"one of {', '.join(WIDTH_LOSSES)}")
        check_budget(self, allow_widths=True)  # a resolved budget holds its widths; api.distill refuses both from a user
        check_setting(self.budget_device in DEVICES, "budget_device", self.budget_device, f"one of {', '.join(DEVICES)}")
        check_setting(self.budget_runtime in RUNTIMES, "budget_runtime", self.budget_runtime,
                      f"one of {', '.join(RUNTIMES)}")
        check_setting(self.budget_batch_size >= 1, "budget_batch_size", self.budget_batch_size, "an integer >= 1")
        check_setting(self.keep_images >= 2, "keep_images", self.keep_images, "an integer >= 2 (search and scoring images)")
        check_setting(self.rank is None or self.rank >= 1, "rank", self.rank, "an integer >= 1")
        check_setting(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "a value in [0, 1)")
        check_setting(self.subset in (None, *SUBSET_RULES), "subset", self.subset, f"one of {', '.join(SUBSET_RULES)}")
        if self.per_class is not None and self.images is not None:
            raise UserError(f"--per-class {self.per_class} and --images {self.images} both size the subset; give one")
        if self.per_class is not None:
            check_setting(self.subset in (None, "per-class"), "subset", self.subset,
                          f"per-class with --per-class {self.per_class} (or --images N with {self.subset})")
            check_setting(isinstance(self.per_class, int) and self.per_class >= 1, "per_class", self.per_class,
                          "an integer >= 1")
        elif self.images is not None:
            check_setting(isinstance(self.images, int) and self.images >= 1, "images", self.images, "an integer >= 1")
        else:
            check_setting(self.ratio is not None and 0.0 < self.ratio <= 1.0, "ratio", self.ratio, "a fraction in (0, 1]")
        check_setting(isinstance(self.coreset_pool, int) and self.coreset_pool >= 2, "coreset_pool", self.coreset_pool,
                      "an integer >= 2")
        check_setting(self.coreset_method in CORESET_METHODS, "coreset_method", self.coreset_method,
                      f"one of {', '.join(CORESET_METHODS)}")
        check_setting(self.min_per_class >= 0, "min_per_class", self.min_per_class, "an integer >= 0")
        check_setting(0 <= self.max_unreadable < 1, "max_unreadable", self.max_unreadable, "a fraction in [0, 1)")
        check_setting(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        self.warmup_epochs = resolve_warmup(self.warmup_epochs, self.epochs, PAPER_WARMUP_EPOCHS)
        check_setting(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check_setting(self.accum_steps >= 1, "accum_steps", self.accum_steps, "an integer >= 1")
        check_setting(self.blr > 0, "blr", self.blr, "a positive number")
        check_setting(self.lr is None or self.lr > 0, "lr", self.lr, "a positive number")
        check_setting(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check_setting(self.num_workers is None or self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        check_setting(self.cache_views is None or self.cache_views >= 1, "cache_views", self.cache_views, "an integer >= 1")
        if isinstance(self.teacher_cache, bool):  # wecolora 0.2's bool (and YAML's bare on/off)
            self.teacher_cache = "on" if self.teacher_cache else "off"
        check_setting(self.teacher_cache in CACHE_POLICIES, "cache_teacher", self.teacher_cache,
               f"one of {', '.join(CACHE_POLICIES)}")
        check_setting(self.cache_max_gb is None or (isinstance(self.cache_max_gb, (int, float)) and self.cache_max_gb > 0),
               "cache_max_gb", self.cache_max_gb, "a positive number of GB")

    def budget(self) -> tuple[str, float] | None:
        """``(name, value)`` of the shape budget given (``speedup``, ``latency_ms`` or ``params``), or None."""
        return next(((name, getattr(self, name)) for name in BUDGETS if getattr(self, name) is not None), None)

    def width_given(self) -> bool:
        return any(getattr(self, name) is not None for name in WIDTH_FIELDS)

    def uses_teacher_cache(self) -> bool:
        """Whether the run caches the teacher's tokens: ``on``, or ``auto`` with a cache folder given.

        An ablate grid turns ``auto`` into ``on`` for its runs (they share one entry); a lone run's tokens
        would never be read back, so ``auto`` alone is off.

        >>> DistillConfig("t", "d", "o").uses_teacher_cache(), DistillConfig("t", "d", "o", teacher_cache_dir="c").uses_teacher_cache()
        (False, True)
        """
        return self.teacher_cache == "on" or (self.teacher_cache == "auto" and self.teacher_cache_dir is not None)

    def peak_lr(self, world_size: int = 1) -> float:
        """Absolute lr: ``--lr`` if given, else the linear scaling rule blr * effective_batch / 256."""
        return self.lr if self.lr is not None else self.blr * self.effective_batch(world_size) / 256

    def effective_batch(self, world_size: int = 1) -> int:
        return self.batch_size * self.accum_steps * world_size


@dataclass
class ProbeConfig(SourceSettings):
    """A linear probe (``wecolora probe``, the ablation grids' ``probe:`` section): MAE's head and LARS.

    The head is MAE's (BatchNorm without affine + Linear; for ``task: segmentation`` a BatchNorm2d + 1x1
    convolution on the patch tokens), trained with LARS at weight decay 0, linear warmup then a
    per-iteration cosine; the LAST epoch's test score is reported. Left out, the lr is MAE's rule
    0.1 x batch / 256 on ImageNet-sized training sets and is chosen by a sweep scored on held-aside
    training images on smaller ones (``evaluation.probe.resolve_settings``); the choice is recorded.
    """
    task: str = "classification"  # classification: CLS features, top-1; segmentation: patch tokens, mIoU
    protocol: str = "cached"  # cached: head on features extracted once; mae: backbone run every epoch
    optimizer: str = "lars"  # lars: MAE's LARS; sgd: SGD + momentum 0.9 (what timm's Lars does at weight decay 0)
    epochs: int = 50  # the paper's recipe for downstream sets (90 for ImageNet)
    batch_size: int | None = None  # default 512 (segmentation 64), capped to 1/16 of a small set when the lr is swept
    lr: float | None = None  # absolute peak lr; default: MAE's rule on ImageNet-sized sets, else a sweep
    warmup_epochs: int | None = None  # default min(10, epochs // 5)
    pooling: str = "cls"  # cls: CLS token after the final norm; mean: mean of the patch tokens
    val_fraction: float = 0.0
    augment: bool = False  # mae protocol only: train the head on augmented images
    train_per_class: int | None = None  # probe on this many training images per class (seeded); default all
    img_size: int | None = None  # run the model at this input size; default its own (a built-in dense set's canvas)
    seed: int = 0
    num_workers: int = 0
    extract_batch_size: int = 256
    cache_dir: str | None = None  # default $WECOLORA_CACHE_DIR/features, else ~/.cache/wecolora/features
    max_unreadable: float = 0.05  # fraction of a split's images that may be unreadable (skipped, counted)

    def __post_init__(self):
        super().__post_init__()
        check_setting(self.task in PROBE_TASKS, "task", self.task, f"one of {', '.join(PROBE_TASKS)}")
        check_setting(self.protocol in PROBE_PROTOCOLS, "protocol", self.protocol, f"one of {', '.join(PROBE_PROTOCOLS)}")
        check_setting(self.optimizer in PROBE_OPTIMIZERS, "optimizer", self.optimizer, f"one of {', '.join(PROBE_OPTIMIZERS)}")
        check_setting(self.pooling in POOLINGS, "pooling", self.pooling, f"one of {', '.join(POOLINGS)}")
        check_setting(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check_setting(self.batch_size is None or self.batch_size >= 2, "batch_size", self.batch_size, "an integer >= 2")
        check_setting(self.lr is None or self.lr > 0, "lr", self.lr, "a positive number")
        check_setting(self.warmup_epochs is None or 0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
               self.warmup_epochs, f"an integer in [0, epochs={self.epochs})")
        check_setting(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "a fraction in [0, 1)")
        check_setting(not self.augment or self.protocol == "mae", "augment", self.augment,
               "only with --protocol mae (cached features are fixed)")
        check_setting(self.train_per_class is None or self.train_per_class >= 1, "train_per_class", self.train_per_class,
               "an integer >= 1")
        check_setting(self.img_size is None or (isinstance(self.img_size, int) and self.img_size >= 1), "img_size",
                      self.img_size, "an integer >= 1 (pixels)")
        check_setting(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        check_setting(self.extract_batch_size >= 1, "extract_batch_size", self.extract_batch_size, "an integer >= 1")
        check_setting(0 <= self.max_unreadable < 1, "max_unreadable", self.max_unreadable, "a fraction in [0, 1)")
        if self.task == "segmentation":  # the dense probe trains on cached patch tokens of every training image
            check_setting(self.protocol == "cached", "protocol", self.protocol, "cached with --task segmentation")
            check_setting(self.train_per_class is None, "train_per_class", self.train_per_class,
                          "none with --task segmentation (its images have no single class)")

    @property
    def resolved_warmup(self) -> int:
        return min(10, self.epochs // 5) if self.warmup_epochs is None else self.warmup_epochs


@dataclass
class KnnConfig(SourceSettings):
    """A weighted kNN evaluation (``wecolora knn``): DINO's vote, k neighbours weighted by exp(cos / T)."""
    k: int = 20
    temperature: float = 0.07
    pooling: str = "cls"  # as ProbeConfig.pooling
    cache_dir: str | None = None  # feature cache; default $WECOLORA_CACHE_DIR/features, else ~/.cache/wecolora/features
    num_workers: int = 0
    extract_batch_size: int = 256
    max_unreadable: float = 0.05  # fraction of a split's images that may be unreadable (skipped, counted)

    def __post_init__(self):
        super().__post_init__()
        check_setting(isinstance(self.k, int) and self.k >= 1, "k", self.k, "an integer >= 1")
        check_setting(self.temperature > 0, "temperature", self.temperature, "a positive number")
        check_setting(self.pooling in POOLINGS, "pooling", self.pooling, f"one of {', '.join(POOLINGS)}")
        check_setting(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        check_setting(self.extract_batch_size >= 1, "extract_batch_size", self.extract_batch_size, "an integer >= 1")
        check_setting(0 <= self.max_unreadable < 1, "max_unreadable", self.max_unreadable, "a fraction in [0, 1)")


@dataclass
class PlanConfig:
    """``wecolora plan``: candidate student shapes of a teacher, built without training and measured on a device.

    Candidates are every depth the reductions give (``keep`` rule) x every residual width (whole heads)
    x every MLP hidden size of the lists; defaults: reductions 1-4, 1/4 to all of the heads, 1/4 to all of
    the neurons in quarters (rounded to multiples of 8).
    """
    teacher: str
    img_size: int | None = None
    device: str = "auto"
    runtime: str = "torch"  # torch | onnxruntime (each candidate exported to ONNX first)
    batch_size: int = DEFAULT_PLAN_BATCH  # images per timed call
    reductions: list[int] | None = None  # default [1, 2, 3, 4]
    keep: str = "first"  # first | last (latency depends on the number of blocks only) | a list: that depth only
    embed_dims: list[int] | None = None  # default: 1/4, 1/2, 3/4 and all of the teacher's heads
    mlp_hiddens: list[int] | None = None  # default: 1/4, 1/2, 3/4 and all of the teacher's neurons
    rounds: int = 3  # interleaved rounds over the candidates (a busy spell hits every candidate alike)
    calls: int = 10  # timed calls per candidate and round; latency = median of all of them
    warmup: int = 3  # untimed calls per candidate first
    memory: bool = True  # peak memory of one call (the CPU profiler is slow for hundreds of candidates)
    speedup: float | None = None
    latency_ms: float | None = None
    params: float | None = None
    output: str | None = None  # folder for plan.json, plan.csv and chart.png

    def __post_init__(self):
        check_setting(self.device in DEVICES, "device", self.device, f"one of {', '.join(DEVICES)}")
        check_setting(self.runtime in RUNTIMES, "runtime", self.runtime, f"one of {', '.join(RUNTIMES)}")
        keep = parse_keep(self.keep)
        check_setting(not isinstance(keep, str) or keep in KEEP_RULES, "keep", self.keep,
                      f"one of {', '.join(KEEP_RULES)} or a list of block indices (latency depends on their number)")
        for name in ("batch_size", "rounds", "calls"):
            check_setting(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                          getattr(self, name), "an integer >= 1")
        check_setting(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", self.warmup, "an integer >= 0")
        for name in ("reductions", "embed_dims", "mlp_hiddens"):
            values = getattr(self, name)
            check_setting(values is None or (len(values) > 0 and all(isinstance(v, int) and v >= 1 for v in values)),
                          name, values, "a list of positive integers")
        check_budget(self)


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


OBJECTIVES = ("supervised", "mae")


MONITORS = {"supervised": "test_top1", "mae": "knn_top1"}  # the label-using score each objective reports
PRETRAIN_WARMUP_EPOCHS = 5  # the bundled teacher's recipe
SUPERVISED_LR = 1e-3  # the bundled supervised teacher's peak lr (absolute)
MAE_BLR = 1.5e-4  # MAE's base lr: peak lr = blr x effective batch / 256 (He et al. 2022, pre-training)
POS_EMBEDS = ("sincos", "learned")  # sincos: MAE's fixed 2-D sine-cosine; learned: timm's trained embedding
INITS = ("mae", "timm")  # mae: MAE's initialize_weights (xavier-uniform linears); timm: timm's ViT init


@dataclass
class PretrainConfig(SourceSettings):
    """A ViT training run (defaults: the bundled supervised Fashion-MNIST teacher's recipe)."""
    data: str
    output: str
    objective: str = "supervised"  # supervised | mae
    model: str = "vit_tiny_patch16_224"  # timm architecture; the size settings below override it
    img_size: int = 28
    patch_size: int = 7
    embed_dim: int = 128
    depth: int = 12
    num_heads: int = 4
    epochs: int = 100
    batch_size: int = 256
    lr: float | None = None  # absolute peak lr; default: mae: blr x batch x processes / 256 (MAE's rule), supervised: 1e-3
    blr: float = MAE_BLR  # mae: base lr of MAE's rule
    warmup_epochs: int | None = None  # default: 5, shortened to fit a run of fewer than 6 epochs
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    shift: int = 2  # supervised: random translation in pixels (pad + random crop)
    # mae: 3 of 4 patches hidden (MAE's ratio); a decoder half the encoder's width and 4 blocks deep:
    # deeper decoders gave MAE much better linear probes (its Table 1a), and at 17 tokens x width 64
    # four blocks cost about 30% of the 12-block encoder on its 5 visible tokens.
    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_depth: int = 4
    norm_pix_loss: bool = True
    pos_embed: str | None = None  # sincos | learned; default: sincos (fixed, MAE's) for mae, learned for supervised
    init: str | None = None  # mae | timm; default: mae (MAE's initialisation) for mae, timm for supervised
    eval_every: int = 5
    seed: int = 0
    precision: str | None = None
    device: str = "auto"
    num_workers: int | None = None
    resume: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_setting(self.objective in OBJECTIVES, "objective", self.objective, f"one of {', '.join(OBJECTIVES)}")
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "epochs", "batch_size", "eval_every",
                     "decoder_dim", "decoder_depth"):
            check_setting(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check_setting(self.img_size % self.patch_size == 0, "patch_size", self.patch_size, f"a divisor of --img-size {self.img_size}")
        check_setting(self.embed_dim % self.num_heads == 0, "num_heads", self.num_heads, f"a divisor of --embed-dim {self.embed_dim}")
        self.warmup_epochs = resolve_warmup(self.warmup_epochs, self.epochs, PRETRAIN_WARMUP_EPOCHS)
        check_setting(self.lr is None or self.lr > 0, "lr", self.lr, "a positive number")
        check_setting(self.blr > 0, "blr", self.blr, "a positive number")
        mae = self.objective == "mae"
        self.pos_embed = self.pos_embed or ("sincos" if mae else "learned")
        self.init = self.init or ("mae" if mae else "timm")
        check_setting(self.pos_embed in POS_EMBEDS, "pos_embed", self.pos_embed, f"one of {', '.join(POS_EMBEDS)}")
        check_setting(self.init in INITS, "init", self.init, f"one of {', '.join(INITS)}")
        check_setting(self.pos_embed == "learned" or self.embed_dim % 4 == 0, "embed_dim", self.embed_dim,
                      "a multiple of 4 with --pos-embed sincos (sine and cosine per axis)")
        check_setting(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "a value in [0, 1)")
        check_setting(self.shift >= 0, "shift", self.shift, "an integer >= 0")
        check_setting(self.precision in (None, *PRECISIONS), "precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        check_setting(self.device in DEVICES, "device", self.device, f"one of {', '.join(DEVICES)}")
        check_setting(0 < self.mask_ratio < 1, "mask_ratio", self.mask_ratio, "a fraction in (0, 1), e.g. 0.75")
        check_setting(self.decoder_dim % 4 == 0, "decoder_dim", self.decoder_dim,
               "a multiple of 4 (2-D sine-cosine positions)")
        decoder_heads(self.decoder_dim)  # equal-width decoder heads

    def peak_lr(self, world_size: int = 1) -> float:
        """Absolute peak lr: ``--lr`` if given; else for MAE its rule, blr x effective batch / 256, and for the
        supervised objective :data:`SUPERVISED_LR`.

        >>> PretrainConfig("d", "o", objective="mae", batch_size=2048).peak_lr(), PretrainConfig("d", "o").peak_lr()
        (0.0012, 0.001)
        """
        if self.lr is not None:
            return self.lr
        return self.blr * self.batch_size * world_size / 256 if self.objective == "mae" else SUPERVISED_LR


DECODER_HEAD_DIM = 32  # the encoder's head width at the bundled shape (128 / 4 heads)


def decoder_heads(dim: int) -> int:
    """Decoder attention heads: head width 32 like the encoder's, at least one head."""
    heads = max(1, dim // DECODER_HEAD_DIM)
    if dim % heads:
        raise UserError(f"--decoder-dim {dim} is invalid: expected a multiple of {DECODER_HEAD_DIM} "
                        f"(or a number below it) so that the decoder's heads have equal width")
    return heads
