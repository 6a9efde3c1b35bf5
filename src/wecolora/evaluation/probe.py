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
import time

import torch
from torch import nn

from wecolora.config import ProbeConfig, build_config
from wecolora.distributed import gather_rows, process_state
from wecolora.errors import UserError
from wecolora.evaluation.features import extract_features, pool_tokens
from wecolora.evaluation.heads import (  # re-exported: the probe's settings and head trainer
    BASE_LR,
    DEFAULT_BATCH,
    MIN_SWEEP_BATCH,
    MIN_UPDATES_PER_EPOCH,
    RULE_MIN_TRAIN,
    SWEEP_HOLDOUT,
    SWEEP_LRS,
    UNDER_TRAINED_RATIO,
    EpochBatches,
    check_training,
    linear_head,
    probe_optimizer,
    resolve_settings,
    rule_lr,
    split_validation,
    sweep_holdout,
    sweep_lr,
    train_head,
)
from wecolora.evaluation.metrics import classification_metrics
from wecolora.evaluation.splits import (
    LabeledSubset,
    join_device,
    label_record,
    open_split,
    open_splits,
    publish,
    readable_indices,
    readable_split,
    split_features,
    unreadable_record,
)
from wecolora.files import check_writable

_logger = logging.getLogger(__name__)

__all__ = [
    "BASE_LR",
    "DEFAULT_BATCH",
    "EpochBatches",
    "MIN_SWEEP_BATCH",
    "MIN_UPDATES_PER_EPOCH",
    "RULE_MIN_TRAIN",
    "SWEEP_HOLDOUT",
    "SWEEP_LRS",
    "UNDER_TRAINED_RATIO",
    "check_training",
    "linear_head",
    "mae_linear_probe",
    "probe",
    "probe_config",
    "probe_optimizer",
    "resolve_settings",
    "rule_lr",
    "split_validation",
    "sweep_holdout",
    "sweep_lr",
    "train_head",
    "train_linear_probe",
]

# The settings, the head and its training: evaluation/heads.py (shared with the dense probe).


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
            "feature_dim": train_feats.shape[1], **stats,
            "under_trained": check_training(stats, resolved["lr_source"]), **resolved,
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
            "feature_dim": test_feats.shape[1], **stats,
            "under_trained": check_training(stats, resolved["lr_source"]), **resolved,
            **swept}  # fmt: skip


# ---------------------------------------------------------------- CLI entry point


def probe(model_spec: str, data: str, output: str, config: ProbeConfig | None = None, *, device: str = "auto",
          test_data: str | None = None, **settings) -> dict:
    """Linear-probe a frozen model on a dataset and write ``output/results.json``.

    Args:
        model_spec: a run folder, a ``student/`` folder or a teacher spec (see :func:`wecolora.teachers.load.load_model`).
        data: a dataset spec (see :func:`wecolora.data.datasets.open_dataset`); its test split is scored.
        output: folder for ``results.json``.
        test_data: the test images when ``data`` has none (labels matched by name to ``data``'s).
        config: the probe's settings (:class:`~wecolora.config.ProbeConfig`: protocol, optimizer, epochs,
            batch size, lr, pooling, train_per_class, ...); ``**settings`` builds one instead.
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        The results written (``top1``, ``top5``, ``n_train``, ``n_test``, ``protocol``, ``optimizer``, ``epochs``,
        ``labels``, ``multilabel``, ...; ``auc``, the mean ROC-AUC over labels, for a multi-label set).

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

        if test_data is not None:
            raise UserError("--test-data is for classification sources; a segmentation set holds its own "
                            "test pairs (val/ or test/)")

        return segmentation_probe(model_spec, data, output, config, device=device)
    out, (state, dev) = check_writable(output), join_device(device)
    model = load_model(model_spec, img_size=config.img_size)
    transform = eval_transform(model)
    train_ds, test_ds = open_splits(data, transform, test_data=test_data, **config.source_options())
    if config.train_per_class is not None and getattr(train_ds, "multilabel", False):
        raise UserError(f"--train-per-class {config.train_per_class} needs one class per image, and {data} is "
                        f"multi-label; leave it out")
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
        fit_ds = open_split(data, "train", train_transform(model), **config.source_options()) if config.augment \
            else train_ds
        if chosen is not None:
            fit_ds, train_ds = LabeledSubset(fit_ds, chosen), LabeledSubset(train_ds, chosen)
        metrics = mae_linear_probe(model, fit_ds, test_ds, config=config, eval_train_ds=train_ds,
                                   num_classes=len(train_ds.classes), device=dev)  # fmt: skip
    results = {**metrics, "task": "classification", **label_record(train_ds), "protocol": config.protocol,
               "model": model_spec, "data": data, **({"test_data": test_data} if test_data else {}),
               "pooling": config.pooling,
               "augment": config.augment, "train_per_class": config.train_per_class, "seed": config.seed,
               "device": str(dev), "processes": state.num_processes, **unreadable_record(bad_train, bad_test),
               "seconds": time.perf_counter() - start}  # fmt: skip
    publish(state, out, results, f"probe {model_spec} on {data} ({config.protocol}, {config.optimizer})")
    return results


