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


def open_split(data: str, split: str, transform):
    from wecolora.data.datasets import open_dataset

    dataset = open_dataset(data, split, transform=transform)
    if len(dataset) == 0:
        raise UserError(f"the {split} split of {data!r} holds no images")
    return dataset


class LabeledSubset(torch.utils.data.Subset):
    """A subset that keeps ``classes``, ``targets`` and ``sample_ids`` (read without loading images; cache keys)."""

    def __init__(self, dataset, indices: list[int]):
        super().__init__(dataset, indices)
        self.classes = dataset.classes
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
        metric = "miou" if "miou" in results else "top1"
        _logger.info("%s: %s %.2f%%", what, metric, 100 * results[metric])
    state.wait_for_everyone()


def write_results(output: str | Path, results: dict) -> Path:
    """Write ``output/results.json`` atomically (a crash leaves the old file or the new one, never half)."""
    path = Path(output) / RESULTS
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path
