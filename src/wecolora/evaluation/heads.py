"""The linear probe's head trainer, shared by the classification probe (:mod:`wecolora.evaluation.probe`) and
the dense one (:mod:`wecolora.evaluation.segmentation`): the settings (MAE's rule or an lr sweep on held-aside
training images), the head, its optimizer and the epochs that train it.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from wecolora.config import ProbeConfig
from wecolora.distributed import process_state
from wecolora.errors import UserError
from wecolora.runtime import make_scheduler

_logger = logging.getLogger(__name__)

BASE_LR = 0.1  # MAE's rule: lr = BASE_LR * batch / 256
DEFAULT_BATCH = 512
RULE_MIN_TRAIN = 100_000  # training images from which the rule's lr is kept (ImageNet-1K: 1.28M; CIFAR: 50k sweeps)
# The sweep's lrs: MAE's rule at batch 512 (0.2) x 1, 4, 16, 64, 256. Absolute, not scaled with the batch: a LARS
# step moves the weight matrix by lr x 0.1% of its norm whatever the batch, and a small set makes few updates.
SWEEP_LRS = (0.2, 0.8, 3.2, 12.8, 51.2)
SWEEP_HOLDOUT = 0.2  # share of the training split (per class) that scores the sweep
MIN_UPDATES_PER_EPOCH = 16  # a swept probe's default batch is capped at n_train / 16 ...
MIN_SWEEP_BATCH = 32  # ... but not below 32 images (BatchNorm statistics)
UNDER_TRAINED_RATIO = 0.8  # flagged when the last epoch's mean loss is above 80% of the first step's


# ---------------------------------------------------------------- settings, training and the lr sweep


def rule_lr(batch_size: int) -> float:
    """MAE's linear scaling rule for the probe: 0.1 x batch / 256."""
    return BASE_LR * batch_size / 256


def resolve_settings(n_train: int, config: ProbeConfig, *, default_batch: int = DEFAULT_BATCH) -> dict:
    """The head's effective settings for ``n_train`` training images, recorded in ``results.json``.

    - ``lr`` given (``lr_source: given``): that lr; the batch (default ``default_batch``) capped at ``n_train``.
    - ``n_train >= RULE_MIN_TRAIN`` (``rule``): MAE's rule 0.1 x batch / 256, the paper's ImageNet setting.
    - smaller sets with LARS (``sweep``): ``lr`` is None and ``lr_candidates`` lists :data:`SWEEP_LRS` for
      :func:`sweep_lr`. Without a given batch, the batch is also capped at ``n_train / 16`` (at least 32)
      so that every epoch makes at least 16 updates.
    - ``--optimizer sgd`` (no trust ratio) keeps the rule at any size.

    Example:
        >>> resolve_settings(1_281_167, ProbeConfig())["lr"], resolve_settings(4000, ProbeConfig())["batch_size"]
        (0.2, 250)
    """
    if n_train < 2:
        raise UserError(f"a linear probe needs at least 2 training images, got {n_train}")
    if config.lr is not None:
        source = "given"
    elif n_train >= RULE_MIN_TRAIN or config.optimizer != "lars":
        source = "rule"
    else:
        source = "sweep"
    batch = config.batch_size
    if batch is None:
        batch = default_batch if source != "sweep" else min(default_batch, max(MIN_SWEEP_BATCH, n_train // MIN_UPDATES_PER_EPOCH))
    batch = min(batch, n_train)
    settings = {"epochs": config.epochs, "batch_size": batch, "optimizer": config.optimizer,
                "warmup_epochs": config.resolved_warmup, "lr_source": source,
                "lr": {"given": config.lr, "rule": rule_lr(batch), "sweep": None}[source]}  # fmt: skip
    if source == "sweep":
        settings["lr_candidates"] = list(SWEEP_LRS)
    return settings


def sweep_lr(candidates: list[float], trial, metric: str) -> tuple[float, list[dict]]:
    """The candidate lr whose head scores best on the held-aside images; of equal scores, the lowest
    held-aside loss (a well-separated set scores 100% at several lrs, not all of them trained alike).

    Args:
        candidates: lrs to try.
        trial: ``trial(lr) -> (score, loss)`` trains a fresh head on the sweep's training part and scores it
            on the held-aside part.
        metric: the score's name in the records (``top1``, ``auc``, ``miou``).

    Returns:
        ``(chosen lr, [{"lr": ..., metric: ..., "loss": ...}, ...])``.
    """
    records = []
    for lr in candidates:
        score, loss = trial(lr)
        records.append({"lr": lr, metric: score, "loss": loss})
        _logger.info("lr sweep: lr %.4g -> held-aside %s %.4f, loss %.4f", lr, metric, score, loss)
    finite = [r for r in records if math.isfinite(r["loss"])] or records
    best = max(finite, key=lambda r: (r[metric], -r["loss"]))
    return best["lr"], records


def sweep_holdout(targets: torch.Tensor | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sweep's ``(training part, held-aside part)`` of a training split: :data:`SWEEP_HOLDOUT` of each class
    (of all images for multi-label targets or a number of images; see :func:`split_validation`)."""
    part, held = split_validation(targets, SWEEP_HOLDOUT, seed, empty_hint=None)
    if held is None or len(part) < 2:
        raise UserError(f"{len(part)} training images are too few to hold some aside for the lr sweep: give --lr "
                        f"(e.g. 4) or more training images")
    return part, held


def check_training(stats: dict, lr_source: str, what: str = "the probe head") -> bool:
    """Whether a head is under-trained (its last epoch's loss above 80% of its first step's), warning if so."""
    under = stats["last_epoch_loss"] > UNDER_TRAINED_RATIO * stats["initial_loss"]
    if under:
        fix = {"given": "leave --lr out (a sweep on held-aside images then chooses it) or raise --lr or --epochs",
               "rule": "give --lr (e.g. 4) or raise --epochs",
               "sweep": "raise --epochs (or give --batch-size smaller, for more updates an epoch)"}[lr_source]
        _logger.warning("%s is under-trained: its training loss went only from %.3f to %.3f, so its score understates "
                        "the features; %s", what, stats["initial_loss"], stats["last_epoch_loss"], fix)
    return under


# ---------------------------------------------------------------- linear probe


def linear_head(dim: int, num_outputs: int) -> nn.Sequential:
    """MAE's probe head: BatchNorm1d without affine (normalises the features) + Linear (std 0.01, bias 0)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_outputs))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


class EpochBatches:
    """Batch sampler: a fresh seeded permutation per pass, the incomplete last batch dropped.

    Dropping it keeps every BatchNorm batch larger than one, as MAE's ``drop_last=True`` does.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator)[: len(self) * self.batch_size]
        yield from order.view(len(self), self.batch_size).tolist()


def split_validation(targets: torch.Tensor | int, fraction: float, seed: int = 0, *,
                     empty_hint: str | None = "--val-fraction") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Carve a validation split from train: ``round(n_c * fraction)`` images of each class.

    Args:
        targets: ``[N]`` class indices (split per class), ``[N, C]`` multi-hot, or a number of images N
            (split at random: dense targets have no one class an image).
        empty_hint: the option named when no image is left aside (None: return no validation split instead).

    Returns:
        ``(train indices, validation indices)``, each sorted; no validation indices (None) for fraction 0.
    """
    n = targets if isinstance(targets, int) else len(targets)
    if fraction <= 0:
        return torch.arange(n), None
    generator = torch.Generator().manual_seed(seed)
    groups = [torch.arange(n)] if isinstance(targets, int) or targets.ndim != 1 else [
        torch.nonzero(targets == c).flatten() for c in targets.unique()]  # fmt: skip
    val = []
    for idx in groups:
        val.append(idx[torch.randperm(len(idx), generator=generator)[: round(len(idx) * fraction)]])
    val = torch.cat(val).sort().values
    if len(val) == 0:
        if empty_hint is None:
            return torch.arange(n), None
        raise UserError(f"{empty_hint} {fraction} leaves no validation image; raise it or use 0")
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


def probe_optimizer(head: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """The probe head's optimizer, momentum 0.9 and weight decay 0 as in MAE's ``main_linprobe``.

    ``lars`` is MAE's LARS: every parameter with more than one dimension has its update scaled by the
    trust ratio 0.001 x |w| / |g| (even at weight decay 0), biases get plain SGD. timm's ``Lars`` skips
    the trust ratio at weight decay 0 unless ``always_adapt`` (which would adapt biases too), hence two
    groups. ``sgd`` is SGD with momentum for every parameter (what 0.1.0 ran).
    """
    from timm.optim import Lars

    params = [p for p in head.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)
    if name != "lars":
        raise UserError(f"--optimizer {name!r} is invalid: expected lars or sgd")
    groups = [{"params": [p for p in params if p.ndim > 1], "always_adapt": True},
              {"params": [p for p in params if p.ndim <= 1], "always_adapt": False}]
    # eps 0: MAE's ratio has no epsilon (a zero norm gives ratio 1 in both implementations).
    return Lars(groups, lr=lr, momentum=0.9, weight_decay=0.0, trust_coeff=0.001, eps=0.0)


def train_head(make_head, epoch_batches, *, steps_per_epoch: int, settings: dict, loss_fn, seed: int,
               device: torch.device) -> tuple[nn.Module, dict]:
    """Train a fresh head (``make_head()`` after seeding) on ``epoch_batches()`` (``(inputs, targets)`` per step).

    Returns:
        The head in eval mode and its loss record: ``initial_loss`` (the first step's, before any update),
        ``last_epoch_loss`` (mean over the last epoch's steps) and ``final_loss`` (the last step's).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    head = make_head().to(device)
    epochs, warmup = settings["epochs"], settings["warmup_epochs"]
    optimizer = probe_optimizer(head, settings["optimizer"], settings["lr"])
    scheduler = make_scheduler(optimizer, epochs, warmup, steps_per_epoch)
    head.train()
    step, loss, initial, epoch_losses = 0, torch.tensor(float("nan")), float("nan"), []
    quiet = None if process_state().is_main_process else True
    for _ in tqdm(range(epochs), desc="probe epochs", leave=False, disable=quiet):
        epoch_losses = []
        for inputs, targets in epoch_batches():
            loss = loss_fn(head(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            epoch_losses.append(loss.detach())
            if step == 1:
                initial = loss.item()
    last = torch.stack(epoch_losses).mean().item() if epoch_losses else float("nan")
    return head.eval(), {"initial_loss": initial, "last_epoch_loss": last, "final_loss": loss.item()}
