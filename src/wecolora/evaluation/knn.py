"""Weighted kNN on frozen features (DINO's vote: the k nearest training images by cosine similarity,
weighted by exp(sim / T)), and the ``wecolora knn`` command's evaluation."""
from __future__ import annotations

import time

import torch
from torch import nn

from wecolora.config import KnnConfig, build_config, check_setting
from wecolora.data.transforms import eval_transform
from wecolora.errors import UserError
from wecolora.evaluation.metrics import classification_metrics
from wecolora.evaluation.splits import (
    join_device,
    label_record,
    open_splits,
    publish,
    readable_split,
    split_features,
    unreadable_record,
)
from wecolora.files import check_writable
from wecolora.teachers.load import load_model


def knn_classify(
    train_feats: torch.Tensor,
    train_y: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """DINO's weighted kNN: each of the k most cosine-similar train images votes ``exp(sim / T)`` for its class.

    Args:
        train_feats, test_feats: ``[N, D]`` features (normalised here).
        train_y: ``[N]`` class indices, or ``[N, C]`` multi-hot (votes per label).
        k: neighbours (capped at the train size).
        temperature: T of the vote weights.
        num_classes: number of classes (default: largest train label + 1).
        chunk_size: test images per similarity block (bounds memory at chunk x N_train).

    Returns:
        ``[N_test, C]`` class scores (summed vote weights).
    """
    check_setting(k >= 1, "k", k, "an integer >= 1")
    check_setting(temperature > 0, "temperature", temperature, "a positive number")
    if len(train_feats) == 0:
        raise UserError("kNN needs at least one training image")
    votes = train_y.float() if train_y.ndim == 2 else nn.functional.one_hot(
        train_y.long(), num_classes or int(train_y.max()) + 1).float()  # fmt: skip
    train_feats = nn.functional.normalize(train_feats.float(), dim=1)
    k = min(k, len(train_feats))
    scores = []
    for chunk in test_feats.split(chunk_size):
        sims, idx = (nn.functional.normalize(chunk.float(), dim=1) @ train_feats.T).topk(k, dim=1)  # [B, k]
        weights = (sims / temperature).exp()
        scores.append(torch.einsum("bk,bkc->bc", weights, votes[idx]))  # votes[idx]: [B, k, C]
    return torch.cat(scores)


def knn(model_spec: str, data: str, output: str, config: KnnConfig | None = None, *, device: str = "auto",
        test_data: str | None = None, **settings) -> dict:
    """Weighted kNN (DINO's) of the test split on the train split's cached features; writes ``results.json``.

    Args:
        model_spec, data, output, device, test_data: as in :func:`wecolora.evaluation.probe.probe`.
        config: k, temperature, pooling, feature cache and loader settings (:class:`~wecolora.config.KnnConfig`);
            ``**settings`` builds one instead.

    Returns:
        The results written (``top1``, ``top5``, ``n_train``, ``n_test``, ``protocol: knn``, ``k``, ...).
    """
    config = config or build_config(KnnConfig, None, **settings)
    out, (state, dev) = check_writable(output), join_device(device)
    model = load_model(model_spec)
    transform = eval_transform(model)
    train_ds, test_ds = open_splits(data, transform, test_data=test_data, **config.source_options())
    (train_ds, bad_train), (test_ds, bad_test) = (readable_split(ds, config.max_unreadable) for ds in (train_ds, test_ds))
    start = time.perf_counter()
    train, test = split_features(model, train_ds, test_ds, data=data, pooling=config.pooling,
                                 cache_dir=config.cache_dir, batch_size=config.extract_batch_size, device=dev,
                                 num_workers=config.num_workers)
    scores = knn_classify(train.features.to(dev), train.labels.to(dev), test.features.to(dev), k=config.k,
                          temperature=config.temperature, num_classes=len(train_ds.classes)).cpu()  # fmt: skip
    results = {**classification_metrics(scores, test.labels), "n_train": len(train.labels), "n_test": len(test.labels),
               **label_record(train_ds), "protocol": "knn", "k": min(config.k, len(train.labels)),
               "temperature": config.temperature, **({"test_data": test_data} if test_data else {}),
               "feature_dim": train.features.shape[1], "model": model_spec, "data": data, "pooling": config.pooling,
               "device": str(dev), "features_cached": train.from_cache and test.from_cache,
               **unreadable_record(bad_train, bad_test), "seconds": time.perf_counter() - start}  # fmt: skip
    publish(state, out, results, f"kNN {model_spec} on {data} (k={config.k})")
    return results
