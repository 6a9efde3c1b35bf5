"""Frozen-feature evaluation of any student or teacher: linear probes and weighted kNN (reports: ``reports.py``).

Two linear-probe protocols train the same head (MAE's: BatchNorm without affine + Linear, MAE's LARS,
lr = 0.1 * batch / 256, warmup + cosine per iteration) and report the LAST epoch's test score:

- ``cached`` (default): on features extracted once and cached on disk; many epochs in seconds.
- ``mae``: the paper's online protocol, running the frozen backbone on the images every epoch
  (optionally with the training augmentation).

Both draw the same seeded batches, so without augmentation they differ only by float rounding.
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

BASE_LR = 0.1  # lr = BASE_LR * batch / 256


# ---------------------------------------------------------------- metrics


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


def split_validation(targets: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Carve a validation split from train: ``round(n_c * fraction)`` images of each class (random for multi-label).

    Returns:
        ``(train indices, validation indices)``, each sorted; no validation indices (None) for fraction 0.
    """
    if fraction <= 0:
        return torch.arange(len(targets)), None
    generator = torch.Generator().manual_seed(seed)
    groups = [torch.arange(len(targets))] if targets.ndim == 2 else [
        torch.nonzero(targets == c).flatten() for c in targets.unique()]  # fmt: skip
    val = []
    for idx in groups:
        val.append(idx[torch.randperm(len(idx), generator=generator)[: round(len(idx) * fraction)]])
    val = torch.cat(val).sort().values
    if len(val) == 0:
        raise UserError(f"--val-fraction {fraction} leaves no validation image; raise it or use 0")
    keep = torch.ones(len(targets), dtype=torch.bool)
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


def _train_head(dim: int, num_outputs: int, epoch_batches, *, sampler: EpochBatches, settings: dict,
                multilabel: bool, seed: int, device: torch.device) -> tuple[nn.Module, float]:
    """Train a fresh head on ``epoch_batches()`` (``(features, targets)`` per step) each epoch.

    Returns:
        The head in eval mode and the last step's loss.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    head = linear_head(dim, num_outputs).to(device)
    epochs, warmup = settings["epochs"], settings["warmup_epochs"]
    optimizer = probe_optimizer(head, settings["optimizer"], settings["lr"])
    scheduler = make_scheduler(optimizer, epochs, warmup, len(sampler))
    loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    head.train()
    step, loss = 0, torch.tensor(float("nan"))
    quiet = None if process_state().is_main_process else True
    for _ in tqdm(range(epochs), desc="probe epochs", leave=False, disable=quiet):
        for features, targets in epoch_batches():
            loss = loss_fn(head(features), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
    return head.eval(), loss.item()


def _probe_settings(n_train: int, config: ProbeConfig) -> dict:
    """Resolve the effective batch (at most the train size), absolute lr and warmup."""
    if n_train < 2:
        raise UserError(f"a linear probe needs at least 2 training images, got {n_train}")
    batch = min(config.batch_size, n_train)
    return {"epochs": config.epochs, "batch_size": batch, "optimizer": config.optimizer,
            "lr": BASE_LR * batch / 256 if config.lr is None else config.lr,
            "warmup_epochs": config.resolved_warmup}  # fmt: skip


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
            ``**settings`` builds one instead, e.g. ``epochs=20, optimizer="sgd"``. The batch is capped
            at the train size; the score is the last epoch's, never the best.
        device: where the head trains.

    Returns:
        ``top1``, ``top5`` (fractions), ``auc`` for multi-label, ``val_top1`` (``val_top5``, ...) when
        validating, ``n_train``, ``n_val``, ``n_test``, ``feature_dim``, ``final_loss`` and the resolved settings.
    """
    config, device = config or probe_config(**settings), torch.device(device)
    fit_idx, val_idx = split_validation(train_y, config.val_fraction, config.seed)
    resolved = _probe_settings(len(fit_idx), config)
    sampler = EpochBatches(len(fit_idx), resolved["batch_size"], config.seed)
    fit_feats, fit_y = train_feats[fit_idx].to(device), train_y[fit_idx].to(device)
    head, loss = _train_head(train_feats.shape[1], _num_outputs(train_y, test_y, num_classes),
                             lambda: ((fit_feats[idx], fit_y[idx]) for idx in sampler), sampler=sampler,
                             settings=resolved, multilabel=train_y.ndim == 2, seed=config.seed, device=device)  # fmt: skip
    val = None if val_idx is None else (train_feats[val_idx], train_y[val_idx])
    return {**_score(head, (test_feats, test_y), val, device), "n_train": len(fit_idx),
            "n_val": 0 if val_idx is None else len(val_idx), "n_test": len(test_y),
            "feature_dim": train_feats.shape[1], "final_loss": loss, **resolved}  # fmt: skip


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
    resolved = _probe_settings(len(fit_idx), config)
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

    head, loss = _train_head(test_feats.shape[1], _num_outputs(train_y, test_y, num_classes), epoch_batches,
                             sampler=sampler, settings=resolved, multilabel=train_y.ndim == 2, seed=config.seed,
                             device=device)  # fmt: skip
    val = None
    if val_idx is not None:
        val_ds = torch.utils.data.Subset(train_ds if eval_train_ds is None else eval_train_ds, val_idx.tolist())
        val = extract_features(model, val_ds, desc="val features", **extract)
    return {**_score(head, (test_feats, test_y), val, device), "n_train": len(fit_idx),
            "n_val": 0 if val_idx is None else len(val_idx), "n_test": len(test_y),
            "feature_dim": test_feats.shape[1], "final_loss": loss, **resolved}  # fmt: skip


# ---------------------------------------------------------------- kNN


# ---------------------------------------------------------------- CLI entry points


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
    out, (state, dev) = check_writable(output), join_device(device)
    model = load_model(model_spec)
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
    results = {**metrics, "protocol": config.protocol, "model": model_spec, "data": data, "pooling": config.pooling,
               "augment": config.augment, "train_per_class": config.train_per_class, "seed": config.seed,
               "device": str(dev), "processes": state.num_processes, **unreadable_record(bad_train, bad_test),
               "seconds": time.perf_counter() - start}  # fmt: skip
    publish(state, out, results, f"probe {model_spec} on {data} ({config.protocol}, {config.optimizer})")
    return results


