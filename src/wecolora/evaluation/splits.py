"""What ``probe`` and ``knn`` share: opening a labelled split, skipping unreadable images, joining torchrun
processes, cached features of both splits, and writing ``results.json`` from the first process."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from wecolora.distributed import join_processes
from wecolora.errors import UserError
from wecolora.evaluation.features import cached_features
from wecolora.files import atomic_write_text
from wecolora.runtime import resolve_device
from wecolora.teachers.vit import model_fingerprint

_logger = logging.getLogger(__name__)


RESULTS = "results.json"


def open_split(data: str, split: str, transform, *, test_data: str | None = None, classes: list[str] | None = None,
               **options):
    """A labelled split to evaluate on. The test split is ``data``'s own, or ``test_data`` (read whole; its own test
    split when it has one) with its labels matched by name to the training split's ``classes``.

    Args:
        options: how the sources are read (:meth:`wecolora.config.SourceSettings.source_options`).
    """
    from wecolora.data.datasets import is_labeled, open_dataset
    from wecolora.data.layout import has_test_split, parse_source

    spec = data
    if split == "test" and test_data is not None:
        spec, split = test_data, "test" if has_test_split(parse_source(test_data, "--test-data")) else "train"
    dataset = open_dataset(spec, split, transform=transform, classes=classes, **options)
    if len(dataset) == 0:
        raise UserError(f"the {split} split of {spec!r} holds no images")
    if not is_labeled(dataset):
        raise UserError(f"{spec} has no labels, and a probe or kNN needs them: use class folders, a csv list with a "
                        f"label column (--label-column), or a datasets table with a label column")
    return dataset


class LabeledSubset(torch.utils.data.Subset):
    """A subset that keeps ``classes``, ``targets`` and ``sample_ids`` (read without loading images; cache keys)."""

    def __init__(self, dataset, indices: list[int]):
        super().__init__(dataset, indices)
        self.classes, self.multilabel = dataset.classes, getattr(dataset, "multilabel", False)
        self.targets = [dataset.targets[i] for i in indices]
        self.sample_ids = [dataset.sample_ids[i] for i in indices]


def readable_indices(dataset, indices: list[int] | None, max_fraction: float) -> tuple[list[int] | None, list[str]]:
    """``indices`` (None: the whole split) without unreadable images, and the skipped ``sample_ids``.

    Damaged files are skipped and counted as ``distill`` does; beyond ``max_fraction`` the probe stops.
    """
    from wecolora.data.subset import drop_unreadable

    kept, skipped = drop_unreadable(dataset, list(range(len(dataset))) if indices is None else indices,
                                    max_fraction=max_fraction)  # fmt: skip
    return (None if indices is None and not skipped else kept), skipped


def readable_split(dataset, max_fraction: float) -> tuple:
    """A whole split without its unreadable images (itself when every image reads) and the skipped ``sample_ids``."""
    kept, skipped = readable_indices(dataset, None, max_fraction)
    return (dataset if kept is None else LabeledSubset(dataset, kept)), skipped


def open_splits(data: str, transform, *, test_data: str | None = None, **options) -> tuple:
    """The labelled train and test splits of a probe or kNN (the test labels matched to the train classes)."""
    train = open_split(data, "train", transform, **options)
    test = open_split(data, "test", transform, test_data=test_data, classes=train.classes, **options)
    if getattr(train, "multilabel", False) != getattr(test, "multilabel", False):
        raise UserError(f"the training images of {data} are {'multi' if train.multilabel else 'single'}-label and the "
                        f"test images are not: give both splits the same kind of labels")
    return train, test


def label_record(train) -> dict:
    """What ``results.json`` says of the labels: their number, and whether the set is multi-label."""
    return {"labels": len(train.classes), "multilabel": bool(getattr(train, "multilabel", False))}


def unreadable_record(train: list[str], test: list[str]) -> dict:
    """What ``results.json`` says of skipped images: their count per split and their names."""
    return {"unreadable_train": len(train), "unreadable_test": len(test), "unreadable_images": train + test}


def join_device(device: str) -> tuple:
    """``(process state, device)``: under torchrun each process gets its own GPU (cuda) and extracts a
    shard of the features; see :mod:`wecolora.distributed`."""
    dev = resolve_device(device)
    state = join_processes(dev)
    return state, state.device if state.num_processes > 1 and dev.type == "cuda" else dev


def split_features(model, train_ds, test_ds, *, data: str, **options):
    """Cached features of the train and test splits (the model's weights hashed once for both keys)."""
    fingerprint = model_fingerprint(model)
    return tuple(cached_features(model, ds, data=data, split=split, fingerprint=fingerprint, **options)
                 for ds, split in ((train_ds, "train"), (test_ds, "test")))


def publish(state, out: Path, results: dict, what: str) -> None:
    """``results.json`` from the first process, then every process waits for it."""
    if state.is_main_process:
        write_results(out, results)
        metric = "auc" if "auc" in results else "miou" if "miou" in results else "top1"
        _logger.info("%s: %s %.2f%%", what, {"auc": "mean ROC-AUC"}.get(metric, metric), 100 * results[metric])
    state.wait_for_everyone()


def write_results(output: str | Path, results: dict) -> Path:
    """Write ``output/results.json`` atomically (a crash leaves the old file or the new one, never half)."""
    path = Path(output) / RESULTS
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path
