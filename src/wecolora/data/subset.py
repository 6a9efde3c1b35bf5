"""The few-shot subset: how it is drawn (:class:`SubsetChoice`: per class, uniformly, or a coreset of the
teacher's features), its manifest (``subset.json``) and ``subset.txt``, skipping unreadable images (remembered
per image identity: path, size and mtime for files), the images that choose kept blocks, and the digest of a
subset's images that names its caches.

Rules (``--subset``):

- ``per-class``: per class, a seeded shuffle of its images of which floor(n_c x ratio) are kept (the paper's
  protocol; the default when the source has labels);
- ``random``: floor(n x ratio) (or ``--images N``) images drawn uniformly, seeded (the default without labels);
- ``coreset``: a candidate pool drawn uniformly (at most ``--coreset-pool`` images), the teacher's CLS feature
  of each, then k-center greedy (farthest point) or k-means++ picks among them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wecolora.config import SUBSET_RULES
from wecolora.data.datasets import is_labeled, to_rgb
from wecolora.data.sources import item_reader
from wecolora.errors import UserError
from wecolora.files import atomic_write_text, cache_folder

_logger = logging.getLogger(__name__)


def fingerprint_data(dataset, indices: list[int]) -> str:
    """A digest of the subset's images: pixels for in-memory sets, each image's identity otherwise ((path, size,
    mtime) for files, the shard's or table's files and the member or row for encoded sources)."""
    digest = hashlib.blake2b(digest_size=16)
    ids = getattr(dataset, "sample_ids", None)
    digest.update("\n".join(ids[i] if ids else str(i) for i in indices).encode())
    if isinstance(getattr(dataset, "images", None), np.ndarray):  # data.ArrayDataset
        digest.update(np.ascontiguousarray(dataset.images[np.asarray(indices, dtype=np.int64)]).data)
    else:
        reader = item_reader(dataset, indices)
        for p in range(len(reader) if reader is not None else 0):
            digest.update(f"{reader.identity(p)};".encode())
    return digest.hexdigest()


def few_shot_indices(
    targets: list[int],
    *,
    ratio: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
    min_per_class: int = 1,
    classes: list[str] | None = None,
    counts: np.ndarray | None = None,
) -> list[int]:
    """The few-shot subset: per class, a seeded shuffle of its images, of which the first k are kept.

    k is ``floor(n_c * ratio)``, ``min(per_class, n_c)`` or ``counts[c]``. Each class draws from its own generator
    seeded with ``(seed, class)``, so the choice ignores the global RNG and does not change when
    other classes are added or removed.

    Args:
        targets: the label of every image.
        ratio: fraction of each class to keep, in (0, 1]. Exactly one of ``ratio`` / ``per_class`` / ``counts``.
        per_class: number of images to keep per class (capped at the class size), at least 1.
        counts: the number to keep of each class (:func:`per_class_counts` shares ``--images N`` this way).
        seed: subset seed (non-negative).
        min_per_class: fewest images any class may end up with.
        classes: class names, so that an error names the class rather than its label.

    Returns:
        The kept indices into ``targets``, sorted.

    Example:
        >>> few_shot_indices([0] * 10 + [1] * 20, ratio=0.1)  # 1 of class 0, 2 of class 1
        [4, 10, 20]
    """
    if sum(x is not None for x in (ratio, per_class, counts)) != 1:
        raise UserError("give exactly one of ratio (fraction per class) or per_class (images per class)")
    if ratio is not None and not 0 < ratio <= 1:
        raise UserError(f"ratio {ratio} is outside (0, 1]; use e.g. 0.01 for 1% of each class")
    if per_class is not None and per_class < 1:
        raise UserError(f"per_class {per_class} must be at least 1")
    if seed < 0:
        raise UserError(f"subset seed {seed} must be non-negative")
    labels = np.asarray(targets, dtype=np.int64)
    if labels.size == 0:
        raise UserError("the dataset holds no images, so no few-shot subset can be drawn")
    kept, short = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        # The epsilon stops float error from dropping an image: 100 * 0.29 is 28.999999999999996.
        k = (math.floor(len(idx) * ratio + 1e-9) if ratio is not None else int(counts[c]) if counts is not None
             else min(per_class, len(idx)))
        if k < min_per_class:
            short.append((int(c), len(idx), k))
        kept.append(np.random.default_rng((seed, int(c))).permutation(idx)[:k])
    if short:
        detail = ", ".join(f"class {classes[c] if classes else c} ({n} images -> {k})" for c, n, k in short)
        fix = (f"use a ratio of at least {min_per_class / min(n for _, n, _ in short):.3g}" if ratio
               else "ask for more --images" if counts is not None else "add images")
        raise UserError(
            f"the few-shot subset keeps fewer than {min_per_class} image(s) in {detail}; "
            f"{fix} or lower --min-per-class"
        )
    return sorted(int(i) for i in np.concatenate(kept))


def write_subset(path, dataset, indices) -> None:
    """Write the chosen images' ``sample_ids``, one a line (a run's ``subset.txt``), atomically."""
    atomic_write_text(path, "".join(dataset.sample_ids[i] + "\n" for i in indices))


def _decodes(reader, p: int) -> bool:
    try:
        with reader.open(p) as f:
            to_rgb(Image.open(f))  # convert() forces a full decode: truncated files fail here
        return True
    except Exception:  # missing files; PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return False


def _readable(reader, workers: int) -> list[bool]:
    """Whether each chosen image decodes. The answer is remembered under the cache folder, keyed by every image's
    identity ((path, size, mtime) for files): a second probe or run on unchanged images decodes nothing here."""
    digest = hashlib.blake2b(digest_size=16)
    identities = [reader.identity(p) for p in range(len(reader))]
    for identity in identities:
        digest.update(f"{identity}\n".encode())
    record = cache_folder("readable") / f"{digest.hexdigest()}.json"
    names = [reader.name(p) for p in range(len(reader))]
    with contextlib.suppress(OSError, ValueError):
        unreadable = set(json.loads(record.read_text()))
        return [name not in unreadable for name in names]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        readable = list(pool.map(lambda p: _decodes(reader, p), range(len(reader))))
    with contextlib.suppress(OSError):  # a read-only cache costs the next run a decode, not this one
        atomic_write_text(record, json.dumps([name for name, ok in zip(names, readable) if not ok]))
    return readable


def drop_unreadable(dataset, indices: list[int], *, max_fraction: float = 0.05, min_per_class: int = 0,
                    workers: int = 8) -> tuple[list[int], list[str]]:
    """The chosen images whose files decode, and the ``sample_ids`` of those skipped (with a warning).

    Images held in memory (the built-ins) are all readable. More than ``max_fraction`` of the choice
    unreadable, or a class left with fewer than ``min_per_class`` images, stops with a UserError:
    a damaged copy of a dataset is better repaired than silently shrunk. Each file is decoded once per
    (path, size, mtime): the verdicts are remembered under ``$WECOLORA_CACHE_DIR/readable``.

    Returns:
        ``(kept indices, skipped sample ids)``.
    """
    reader = item_reader(dataset, indices) if indices else None
    if reader is None:
        return list(indices), []
    readable = _readable(reader, workers)
    kept = [i for i, ok in zip(indices, readable) if ok]
    skipped = [dataset.sample_ids[i] for i, ok in zip(indices, readable) if not ok]
    if not skipped:
        return kept, skipped
    shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    if len(skipped) > max_fraction * len(indices):
        raise UserError(f"{len(skipped)} of the {len(indices)} chosen images cannot be read ({shown}): more than "
                        f"{max_fraction:.0%}; repair or remove the damaged (or missing) files, or raise --max-unreadable")
    if min_per_class <= 0 or not is_labeled(dataset) or getattr(dataset, "multilabel", False):
        _logger.warning("skipping %d unreadable image(s) of %d: %s", len(skipped), len(indices), shown)
        return kept, skipped
    counts = np.bincount(np.asarray([dataset.targets[i] for i in kept], dtype=np.int64), minlength=len(dataset.classes))
    short = [dataset.classes[c] for c in np.unique([dataset.targets[i] for i in indices]) if counts[c] < min_per_class]
    if short:
        raise UserError(f"without its unreadable images ({shown}), class(es) {', '.join(short)} keep fewer than "
                        f"{min_per_class} image(s); repair the files, raise --ratio or lower --min-per-class")
    _logger.warning("skipping %d unreadable image(s) of %d: %s", len(skipped), len(indices), shown)
    return kept, skipped


def subset_images(dataset, indices: list[int], transform, *, count: int, seed: int) -> torch.Tensor:
    """Up to ``count`` images of the few-shot subset (a seeded draw), preprocessed: ``[N, C, H, W]``."""
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [indices[i] for i in order[:count]]
    return torch.stack([transform(dataset[i][0]) for i in chosen])


# ---------------------------------------------------------------------------------------------
# Drawing the subset: per class, uniformly, or a coreset


RANDOM_STREAM, POOL_STREAM, CORESET_STREAM = 0x72616E64, 0x706F6F6C, 0x636F7265  # "rand", "pool", "core"
MANIFEST = "subset.json"


def subset_size(n: int, *, ratio: float | None = None, images: int | None = None) -> int:
    """How many images a draw of ``ratio`` (floor(n x ratio), at least 1) or ``images`` (at most n) keeps.

    >>> subset_size(60000, ratio=0.01), subset_size(50, ratio=0.001), subset_size(50, images=80)
    (600, 1, 50)
    """
    if images is not None:
        return min(images, n)
    return max(1, math.floor(n * ratio + 1e-9))


def random_indices(n: int, k: int, seed: int, stream: int = RANDOM_STREAM) -> list[int]:
    """``k`` of ``range(n)`` drawn uniformly without replacement from a generator seeded with (seed, stream),
    sorted. Memory grows with k, not n.

    >>> random_indices(10, 3, 0) == random_indices(10, 3, 0), len(random_indices(10 ** 9, 5, 1))
    (True, 5)
    """
    rng = np.random.default_rng([seed, stream])
    return sorted(int(i) for i in rng.choice(n, size=min(k, n), replace=False))


def per_class_counts(counts: np.ndarray, images: int) -> np.ndarray:
    """``images`` shared among classes in proportion to their sizes (largest remainders; no class above its size).

    >>> per_class_counts(np.array([10, 30]), 8).tolist(), per_class_counts(np.array([1, 99]), 10).tolist()
    ([2, 6], [0, 10])
    """
    images = min(images, int(counts.sum()))
    exact = counts * images / counts.sum()
    share = np.floor(exact).astype(np.int64)
    for c in np.argsort(-(exact - share), kind="stable")[: images - int(share.sum())]:
        share[c] += 1
    return np.minimum(share, counts)


def kcenter_greedy(features: torch.Tensor, k: int, seed: int = 0) -> list[int]:
    """Farthest-point (k-center greedy) picks: a seeded first point, then repeatedly the point farthest from
    every pick so far, on L2-normalised features. Returns the picked rows in pick order.

    >>> x = torch.tensor([[0.0, 1.0], [0.0, 1.1], [1.0, 0.0], [1.0, 0.1]])
    >>> sorted(kcenter_greedy(x, 2)) in ([0, 2], [0, 3], [1, 2], [1, 3])
    True
    """
    x = torch.nn.functional.normalize(features.double(), dim=1)
    n = len(x)
    k = min(k, n)
    picks = [int(np.random.default_rng([seed, CORESET_STREAM]).integers(n))]
    distance = (x - x[picks[0]]).square().sum(1)
    while len(picks) < k:
        pick = int(torch.argmax(distance))
        picks.append(pick)
        distance = torch.minimum(distance, (x - x[pick]).square().sum(1))
    return picks


def kmeanspp(features: torch.Tensor, k: int, seed: int = 0) -> list[int]:
    """k-means++ seeding picks (D^2 sampling): a seeded first point, then each next one drawn with probability
    proportional to its squared distance to the nearest pick, on L2-normalised features. Returns the picked
    rows in pick order."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    n = len(x)
    k = min(k, n)
    rng = np.random.default_rng([seed, CORESET_STREAM])
    picks = [int(rng.integers(n))]
    distance = (x - x[picks[0]]).square().sum(1)
    while len(picks) < k:
        weights = distance.clamp_min(0).numpy()
        if weights.sum() <= 0:  # every remaining point duplicates a pick
            weights = np.ones(n)
            weights[picks] = 0
        pick = int(rng.choice(n, p=weights / weights.sum()))
        picks.append(pick)
        distance = torch.minimum(distance, (x - x[pick]).square().sum(1))
    return picks


CORESET_PICKS = {"kcenter": kcenter_greedy, "kmeans++": kmeanspp}


class SubsetChoice:
    """The few-shot subset of a run: its rule resolved against the source, its candidates drawn and checked
    (:meth:`prepare`, before any weight is read), then its images chosen (:meth:`choose`; a coreset needs the
    teacher's features of the candidates).

    Args:
        dataset: the opened source (``classes == []`` when unlabeled).
        rule: ``per-class``, ``random`` or ``coreset``; None: per-class with labels, random without.
        ratio, images, per_class: the size: a fraction (per class for per-class, of the source otherwise), a
            number of images in all, or (per-class only) a number per class.
        seed: the subset seed.
        min_per_class, max_unreadable: as :func:`few_shot_indices` and :func:`drop_unreadable`.
        pool: coreset: the most candidates drawn (uniformly, seeded) and compared.
        method: coreset: ``kcenter`` or ``kmeans++``.
        source: what the manifest says of the source (:meth:`wecolora.data.layout.Source.record`).

    Example:
        >>> choice = SubsetChoice(open_dataset("mnist-5k"), rule="random", ratio=0.01).prepare()  # doctest: +SKIP
        >>> indices, unreadable = choice.choose()  # doctest: +SKIP
    """

    def __init__(self, dataset, *, rule: str | None = None, ratio: float | None = 0.01, images: int | None = None,
                 per_class: int | None = None, seed: int = 0, min_per_class: int = 1, max_unreadable: float = 0.05,
                 pool: int = 10_000, method: str = "kcenter", source: dict | None = None):
        labeled = is_labeled(dataset)
        if rule is None:
            rule = "per-class" if labeled and not getattr(dataset, "multilabel", False) else "random"
        if rule not in SUBSET_RULES:
            raise UserError(f"--subset {rule!r} is invalid: expected one of {', '.join(SUBSET_RULES)}")
        where = getattr(dataset, "where", None) or (source or {}).get("spec", "the source")
        if rule == "per-class" and not labeled:
            raise UserError(f"--subset per-class needs labels, and {where} is unlabeled; use --subset random or "
                            f"--subset coreset (or a source with labels)")
        if rule == "per-class" and getattr(dataset, "multilabel", False):
            raise UserError(f"--subset per-class needs one class per image, and {where} is multi-label; use "
                            f"--subset random or --subset coreset")
        if len(dataset) == 0:
            raise UserError(f"{where} holds no images, so no few-shot subset can be drawn")
        if method not in CORESET_PICKS:
            raise UserError(f"--coreset-method {method!r} is invalid: expected one of {', '.join(CORESET_PICKS)}")
        self.dataset, self.rule, self.ratio, self.images, self.per_class = dataset, rule, ratio, images, per_class
        self.seed, self.min_per_class, self.max_unreadable = seed, min_per_class, max_unreadable
        self.pool_size, self.method, self.source = pool, method, source
        self.count = None if rule == "per-class" else subset_size(len(dataset), ratio=ratio, images=images)
        self.candidates: list[int] | None = None
        self.indices: list[int] | None = None
        self.unreadable: list[str] = []
        self.pool_unreadable: list[str] = []
        self.from_manifest = False

    @classmethod
    def from_config(cls, dataset, config, *, source: dict | None = None) -> SubsetChoice:
        """The choice a :class:`~wecolora.config.DistillConfig` asks for."""
        return cls(dataset, rule=config.subset, ratio=config.ratio, images=config.images, per_class=config.per_class,
                   seed=config.subset_seed, min_per_class=config.min_per_class, max_unreadable=config.max_unreadable,
                   pool=config.coreset_pool, method=config.coreset_method, source=source)

    @property
    def needs_features(self) -> bool:
        """Whether :meth:`choose` needs the teacher's features (a coreset not read from a manifest)."""
        return self.rule == "coreset" and self.indices is None

    def prepare(self, *, workers: int = 8) -> SubsetChoice:
        """Draw the candidates and skip the unreadable ones: the subset itself (per-class, random), or the coreset's
        pool. Labels, sizes and damaged images are refused here, before a teacher is loaded."""
        if self.indices is not None:  # read from a manifest
            return self
        n = len(self.dataset)
        if self.rule == "per-class":
            counts = None if self.images is None else per_class_counts(
                np.bincount(np.asarray(self.dataset.targets, dtype=np.int64), minlength=len(self.dataset.classes)),
                self.images)
            drawn = few_shot_indices(self.dataset.targets, ratio=None if self.per_class or counts is not None else self.ratio,
                                     per_class=self.per_class, counts=counts, seed=self.seed,
                                     min_per_class=self.min_per_class, classes=self.dataset.classes)
            self.indices, self.unreadable = drop_unreadable(self.dataset, drawn, max_fraction=self.max_unreadable,
                                                            min_per_class=self.min_per_class, workers=workers)
        elif self.rule == "random":
            drawn = random_indices(n, self.count, self.seed)
            self.indices, self.unreadable = drop_unreadable(self.dataset, drawn, max_fraction=self.max_unreadable,
                                                            workers=workers)
        else:
            pool = random_indices(n, max(self.pool_size, self.count), self.seed, POOL_STREAM)
            self.candidates, self.pool_unreadable = drop_unreadable(self.dataset, pool, max_fraction=self.max_unreadable,
                                                                    workers=workers)
            if len(self.candidates) < self.count:
                raise UserError(f"the coreset's pool holds {len(self.candidates)} readable images, fewer than the "
                                f"{self.count} asked for; lower --ratio/--images or repair the images")
        return self

    def choose(self, features: Callable[[list[int]], torch.Tensor] | None = None) -> tuple[list[int], list[str]]:
        """The subset's indices (sorted) and the ``sample_ids`` of chosen images skipped as unreadable.

        Args:
            features: for a coreset, ``features(indices) -> [len(indices), D]``: the teacher's CLS features of
                the candidates (:func:`wecolora.evaluation.features.coreset_features`).
        """
        if self.indices is None and self.candidates is None:
            self.prepare()
        if self.indices is None:  # a coreset: picked among the candidates
            if features is None:
                raise ValueError("a coreset subset needs the features of its candidates")
            feats = features(self.candidates)
            picks = CORESET_PICKS[self.method](feats, self.count, self.seed)
            self.indices = sorted(self.candidates[p] for p in picks)
        return list(self.indices), list(self.unreadable)

    def record(self) -> dict:
        """What ``config.yaml`` (``resolved.subset``) and the manifest say of the choice."""
        size = ({"per_class": self.per_class} if self.per_class is not None else
                {"images_asked": self.images} if self.images is not None else {"ratio": self.ratio})
        record = {"rule": self.rule, **size, "seed": self.seed, "images": len(self.indices or ()),
                  "of": len(self.dataset), "labeled": is_labeled(self.dataset),
                  "unreadable_skipped": len(self.unreadable)}
        if self.rule == "coreset":
            record.update(method=self.method, pool=len(self.candidates or ()) + len(self.pool_unreadable),
                          pool_cap=self.pool_size, pool_unreadable=len(self.pool_unreadable),
                          features="teacher CLS token after the final norm, L2-normalised")
        if self.source is not None:
            record["source"] = self.source
        if self.from_manifest:
            record["from_manifest"] = True
        return record

    def write(self, folder: str | Path) -> None:
        """The run's manifest ``subset.json`` (source, rule, size, seed and every chosen key) and ``subset.txt``
        (one key a line), written atomically."""
        folder = Path(folder)
        record = {**self.record(), "keys": [self.dataset.sample_ids[i] for i in self.indices],
                  "unreadable": list(self.unreadable)}
        record.pop("from_manifest", None)
        atomic_write_text(folder / MANIFEST, json.dumps(record, indent=1) + "\n")
        write_subset(folder / "subset.txt", self.dataset, self.indices)

    def reuse(self, manifest: str | Path) -> bool:
        """Take the images a run's ``subset.json`` names (a resumed run uses the images it started with); False
        when there is no manifest. A key the source no longer holds is refused in one line."""
        manifest = Path(manifest)
        if not manifest.is_file():
            return False
        try:
            saved = json.loads(manifest.read_text())
            keys = list(saved["keys"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{manifest} is damaged ({err}); restart the run with --overwrite") from None
        position = {key: i for i, key in enumerate(self.dataset.sample_ids)}
        missing = [key for key in keys if key not in position]
        if missing:
            raise UserError(f"the run's {manifest.name} names {len(missing)} image(s) the source no longer holds "
                            f"(first: {missing[0]}); restore them or restart the run with --overwrite")
        self.indices = sorted(position[key] for key in keys)
        self.unreadable = list(saved.get("unreadable", []))
        self.from_manifest = True
        _logger.info("subset: reusing the %d images of %s", len(self.indices), manifest)
        return True
