"""Frozen-feature evaluation of any student or teacher: linear probes (the dense one: ``segmentation.py``).

Two linear-probe protocols train the same head (MAE's: BatchNorm without affine + Linear, MAE's LARS,
warmup + cosine per iteration) and report the LAST epoch's test score:

- ``cached`` (default): on features extracted once and cached on disk; many epochs in seconds.
- ``mae``: the paper's online protocol, running the frozen backbone on the images every epoch
  (optionally with the training augmentation).

Both draw the same seeded batches, so without augmentation they differ only by float rounding.

The lr, left out, is settled by :func:`resolve_settings`: MAE's rule 0.1 x batch / 256 on ImageNet-sized
training sets (:data:`RULE_MIN_TRAIN` images or more), where it was tuned; on smaller sets the rule barely
moves a LARS head (each step moves the weight matrix by about lr x 0.1% of its norm), so the lr is chosen
by a sweep (:func:`sweep_lr`) scored on training images held aside, and the head is then trained on the
whole training split. A head whose training loss ends near where it began is flagged ``under_trained``.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from wecolora.config import ProbeConfig, build_config
from wecolora.distributed import gather_rows, process_state
from wecolora.errors import UserError
from wecolora.evaluation.features import extract_features, pool_tokens
from wecolora.evaluation.metrics import classification_metrics
from wecolora.evaluation.splits import (
    LabeledSubset,
    join_device,
    open_split,
    publish,
    readable_indices,
    readable_split,
    split_features,
    unreadable_record,
)
from wecolora.files import check_writable
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


def check_training(stats: dict, what: str = "the probe head") -> bool:
    """Whether a head is under-trained (its last epoch's loss above 80% of its first step's), warning if so."""
    under = stats["last_epoch_loss"] > UNDER_TRAINED_RATIO * stats["initial_loss"]
    if under:
        _logger.warning("%s is under-trained: its training loss went only from %.3f to %.3f, so its score understates "
                        "the features; leave --lr out (a sweep then chooses it) or raise --lr or --epochs", what,
                        stats["initial_loss"], stats["last_epoch_loss"])
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


def _classification_loss(multilabel: bool) -> nn.Module:
    return nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()


def _train_on_features(features: torch.Tensor, targets: torch.Tensor, settings: dict, *, num_outputs: int,
                       seed: int, device: torch.device) -> tuple[nn.Module, dict]:
    """A linear head trained on fixed ``[N, D]`` features (already on ``device``)."""
    sampler = EpochBatches(len(features), min(settings["batch_size"], len(features)), seed)
    return train_head(lambda: linear_head(features.shape[1], num_outputs),
                      lambda: ((features[idx], targets[idx]) for idx in sampler), steps_per_epoch=len(sampler),
                      settings=settings, loss_fn=_classification_loss(targets.ndim == 2), seed=seed, device=device)


def _sweep_on_features(features: torch.Tensor, targets: torch.Tensor, settings: dict, *, num_outputs: int,
                       seed: int, device: torch.device) -> tuple[float, list[dict], int]:
    """The swept lr for a classification head on fixed features: ``(lr, records, held-aside images)``."""
    part, held = sweep_holdout(targets.cpu(), seed)
    metric = "auc" if targets.ndim == 2 else "top1"

    def trial(lr: float) -> tuple[float, float]:
        head, _ = _train_on_features(features[part], targets[part], {**settings, "lr": lr}, num_outputs=num_outputs,
                                     seed=seed, device=device)
        with torch.no_grad():
            loss = _classification_loss(targets.ndim == 2)(head(features[held]), targets[held]).item()
        return _score(head, (features[held].cpu(), targets[held].cpu()), None, device)[metric], loss

    lr, records = sweep_lr(settings["lr_candidates"], trial, metric)
    return lr, records, len(held)


def _settle_lr(settings: dict, sweep) -> dict:
    """``settings`` with the lr the sweep chose, and the sweep's record (``{}`` when the lr needed none)."""
    if settings["lr"] is not None:
        return {}
    settings["lr"], records, held = sweep()
    settings.pop("lr_candidates")
    return {"lr_sweep": records, "sweep_holdout": held}


@torch.no_grad()
def _score(head: nn.Module, test: tuple, val: tuple | None, device: torch.device, chunk: int = 8192) -> dict:
    """Test metrics of the trained head, plus the validation ones prefixed ``val_``."""
    def scores(features):
        return torch.cat([head(f.to(device)).float().cpu() for f in features.split(chunk)])

    metrics = classification_metrics(scores(test[0]), test[1])
    if val is not None:
        metrics.update({f"val_{name}": value for name, value in classification_metrics(scores(val[0]), val[1]).items()})
    return metrics


def _num_outputs(train_y: torch.Tensor, test_y: torch.Tensor, num_classes: int | None) -> int:
    if train_y.ndim == 2:
        return train_y.shape[1]
    return num_classes or int(max(train_y.max(), test_y.max())) + 1


def train_linear_probe(
    train_feats: torch.Tensor,
    train_y: torch.Tensor,
    test_feats: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int | None = None,
    config: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    **settings,
) -> dict:
    """Train the probe head on fixed features and score the last epoch on the test features.

    Args:
        train_feats, test_feats: ``[N, D]`` features.
        train_y, test_y: ``[N]`` class indices, or ``[N, C]`` multi-hot (BCE loss, mean ROC-AUC).
        num_classes: head size for single-label data (default: largest label + 1).
        config: the probe's settings (epochs, batch size, lr, warmup, optimizer, val_fraction, seed);
            ``**settings`` builds one instead, e.g. ``epochs=20, optimizer="sgd"``. The batch and lr are
            settled by :func:`resolve_settings` (a sweep on held-aside training features when the lr is
            left out on a small set); the score is the last epoch's, never the best.
        device: where the head trains.

    Returns:
        ``top1``, ``top5`` (fractions), ``auc`` for multi-label, ``val_top1`` (``val_top5``, ...) when
        validating, ``n_train``, ``n_val``, ``n_test``, ``feature_dim``, the loss record (``initial_loss``,
        ``last_epoch_loss``, ``final_loss``, ``under_trained``), the resolved settings (``lr``, ``lr_source``,
        ``batch_size``, ...) and, when swept, ``lr_sweep`` (each lr and its held-aside score) and ``sweep_holdout``.
    """
    config, device = config or probe_config(**settings), torch.device(device)
    fit_idx, val_idx = split_validation(train_y, config.val_fraction, config.seed)
    resolved = resolve_settings(len(fit_idx), config)
    fit_feats, fit_y = train_feats[fit_idx].to(device), train_y[fit_idx].to(device)
    options = dict(num_outputs=_num_outputs(train_y, test_y, num_classes), seed=config.seed, device=device)
    sweep = _settle_lr(resolved, lambda: _sweep_on_features(fit_feats, fit_y, resolved, **options))
    head, stats = _train_on_features(fit_feats, fit_y, resolved, **options)
    val = None if val_idx is None else (train_feats[val_idx], train_y[val_idx])
    return {**_score(head, (test_feats, test_y), val, device), "n_train": len(fit_idx),
            "n_val": 0 if val_idx is None else len(val_idx), "n_test": len(test_y),
            "feature_dim": train_feats.shape[1], **stats, "under_trained": check_training(stats), **resolved,
            **sweep}  # fmt: skip


def probe_config(**settings) -> ProbeConfig:
    """A :class:`~wecolora.config.ProbeConfig` from keywords (None: the default); an unknown one is named."""
    return build_config(ProbeConfig, None, **settings)


def mae_linear_probe(
    model: nn.Module,
    train_ds: torch.utils.data.Dataset,
    test_ds: torch.utils.data.Dataset,
    *,
    config: ProbeConfig,
    eval_train_ds: torch.utils.data.Dataset | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """The paper's online protocol: every epoch runs the frozen ``model`` on the (augmented) train images.

    Args:
        model: frozen backbone; never updated.
        train_ds: train images (with ``targets``) and the training transform (the eval one for no augmentation).
        test_ds: test images with the eval transform.
        config: the probe's settings (pooling, epochs, batch size, lr, optimizer, workers, ...).
        eval_train_ds: the train images with the eval transform, for the validation split
            (default ``train_ds``).
        num_classes, device: as in :func:`train_linear_probe`.

    Returns:
        The same keys as :func:`train_linear_probe`.
    """
    device = torch.device(device)
    model.eval().to(device)
    train_y = torch.as_tensor(train_ds.targets)
    pooling, workers = config.pooling, config.num_workers
    extract = dict(pooling=pooling, batch_size=config.extract_batch_size, device=device, num_workers=workers)
    test_feats, test_y = extract_features(model, test_ds, desc="test features", **extract)
    fit_idx, val_idx = split_validation(train_y, config.val_fraction, config.seed)
    resolved = resolve_settings(len(fit_idx), config)
    num_outputs = _num_outputs(train_y, test_y, num_classes)
    eval_ds = train_ds if eval_train_ds is None else eval_train_ds

    def sweep():  # on fixed features of the training images (eval transform): the online epochs are costly
        feats, targets = extract_features(model, torch.utils.data.Subset(eval_ds, fit_idx.tolist()),
                                          desc="sweep features", **extract)  # fmt: skip
        return _sweep_on_features(feats.to(device), targets.to(device), resolved, num_outputs=num_outputs,
                                  seed=config.seed, device=device)

    swept = _settle_lr(resolved, sweep)
    sampler = EpochBatches(len(fit_idx), resolved["batch_size"], config.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_ds, fit_idx.tolist()), batch_sampler=sampler,
                                         num_workers=workers, persistent_workers=workers > 0)  # fmt: skip

    state = process_state()

    def epoch_batches():
        for images, targets in loader:
            # Under torchrun each process runs the backbone on a slice of the batch and every process
            # trains the same head on the gathered batch (the head is small; its updates stay identical).
            slices = images.tensor_split(state.num_processes)
            with torch.no_grad():  # no_grad, not inference_mode: the features feed the head's autograd
                features = pool_tokens(model, slices[state.process_index].to(device), pooling).float()
                features = gather_rows(features, [len(part) for part in slices])
            yield features, torch.as_tensor(targets).to(device)

    head, stats = train_head(lambda: linear_head(test_feats.shape[1], num_outputs), epoch_batches,
                             steps_per_epoch=len(sampler), settings=resolved,
                             loss_fn=_classification_loss(train_y.ndim == 2), seed=config.seed, device=device)
    val = None
    if val_idx is not None:
        val = extract_features(model, torch.utils.data.Subset(eval_ds, val_idx.tolist()), desc="val features", **extract)
    return {**_score(head, (test_feats, test_y), val, device), "n_train": len(fit_idx),
            "n_val": 0 if val_idx is None else len(val_idx), "n_test": len(test_y),
            "feature_dim": test_feats.shape[1], **stats, "under_trained": check_training(stats), **resolved,
            **swept}  # fmt: skip


# ---------------------------------------------------------------- CLI entry point


def probe(model_spec: str, data: str, output: str, config: ProbeConfig | None = None, *, device: str = "auto",
          **settings) -> dict:
    """Linear-probe a frozen model on a dataset and write ``output/results.json``.

    Args:
        model_spec: a run folder, a ``student/`` folder or a teacher spec (see :func:`wecolora.teachers.load.load_model`).
        data: a dataset spec (see :func:`wecolora.data.datasets.open_dataset`); its test split is scored.
        output: folder for ``results.json``.
        config: the probe's settings (:class:`~wecolora.config.ProbeConfig`: protocol, optimizer, epochs,
            batch size, lr, pooling, train_per_class, ...); ``**settings`` builds one instead.
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        The results written (``top1``, ``top5``, ``n_train``, ``n_test``, ``protocol``, ``optimizer``, ``epochs``, ...).

    Example:
        >>> results = probe("runs/vit-s", "mnist-5k", "runs/vit-s/probe", epochs=90)  # doctest: +SKIP
        >>> results["top1"], results["optimizer"]  # doctest: +SKIP
    """
    from wecolora.data.subset import few_shot_indices
    from wecolora.data.transforms import eval_transform, train_transform
    from wecolora.teachers.load import load_model

    config = config or probe_config(**settings)
    if config.task == "segmentation":
        from wecolora.evaluation.segmentation import segmentation_probe

        return segmentation_probe(model_spec, data, output, config, device=device)
    out, (state, dev) = check_writable(output), join_device(device)
    model = load_model(model_spec, img_size=config.img_size)
    transform = eval_transform(model)
    train_ds, test_ds = open_split(data, "train", transform), open_split(data, "test", transform)
    chosen = None if config.train_per_class is None else few_shot_indices(
        train_ds.targets, per_class=config.train_per_class, seed=config.seed)  # fmt: skip
    chosen, bad_train = readable_indices(train_ds, chosen, config.max_unreadable)
    test_ds, bad_test = readable_split(test_ds, config.max_unreadable)
    start = time.perf_counter()
    if config.protocol == "cached":
        # Only the chosen images are extracted; their ids are part of the cache key.
        fit_ds = train_ds if chosen is None else LabeledSubset(train_ds, chosen)
        train, test = split_features(model, fit_ds, test_ds, data=data, pooling=config.pooling,
                                      cache_dir=config.cache_dir, batch_size=config.extract_batch_size, device=dev,
                                      num_workers=config.num_workers)  # fmt: skip
        metrics = train_linear_probe(train.features, train.labels, test.features, test.labels, config=config,
                                     num_classes=len(train_ds.classes), device=dev)  # fmt: skip
        metrics["features_cached"] = train.from_cache and test.from_cache
    else:
        fit_ds = open_split(data, "train", train_transform(model)) if config.augment else train_ds
        if chosen is not None:
            fit_ds, train_ds = LabeledSubset(fit_ds, chosen), LabeledSubset(train_ds, chosen)
        metrics = mae_linear_probe(model, fit_ds, test_ds, config=config, eval_train_ds=train_ds,
                                   num_classes=len(train_ds.classes), device=dev)  # fmt: skip
    results = {**metrics, "task": "classification", "protocol": config.protocol, "model": model_spec, "data": data, "pooling": config.pooling,
               "augment": config.augment, "train_per_class": config.train_per_class, "seed": config.seed,
               "device": str(dev), "processes": state.num_processes, **unreadable_record(bad_train, bad_test),
               "seconds": time.perf_counter() - start}  # fmt: skip
    publish(state, out, results, f"probe {model_spec} on {data} ({config.protocol}, {config.optimizer})")
    return results


