"""``wecolora views``: the first training views a distillation would show, written as images for a person to see.

A distillation's views are reproducible (:mod:`wecolora.data.views`): epoch ``e`` shows view ``e mod K`` of every
subset image (``K``: ``--cache-views``, default ``--epochs``), in the order the epoch's loader draws from
``seed + e`` (:func:`wecolora.cache.images.store_loader`). This module builds the same subset, image store and
loaders as :func:`wecolora.train.distill.distill` (one process) and writes, in that order, each view at the
model's input size before normalisation (``view-000.png`` ...) and ``views.json``: per view, the source image, its
crop box on the original file ``[top, left, height, width]`` and whether it is flipped. The box is the one
torchvision's ``RandomResizedCrop`` draws on the original; the view is what PIL makes of it (bicubic,
antialiased), up to 8-bit rounding.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wecolora.cache.admin import CacheCap
from wecolora.cache.images import StoreBatches, open_store, store_loader
from wecolora.config import DistillConfig
from wecolora.data.views import ViewRecipe
from wecolora.errors import UserError
from wecolora.files import atomic_write_text
from wecolora.runtime import loader_workers
from wecolora.teachers.load import load_model, model_shape
from wecolora.train.distill import choose_subset, open_subset

_logger = logging.getLogger(__name__)

RECORD = "views.json"
VIEW_FILE = re.compile(r"view-\d+\.png")


def view_name(number: int, count: int) -> str:
    """``view-000.png``: three digits, more when ``count`` needs them.

    >>> view_name(7, 16), view_name(7, 12800)
    ('view-007.png', 'view-00007.png')
    """
    return f"view-{number:0{max(3, len(str(count - 1)))}d}.png"


def image_source(dataset, index: int, data: str) -> str:
    """What ``views.json`` names as a view's image: the file's path, or ``SPEC:ID`` for a built-in dataset."""
    samples = getattr(dataset, "samples", None)
    return str(Path(samples[index][0]).resolve()) if samples is not None else f"{data}:{dataset.sample_ids[index]}"


def check_output(output: Path) -> None:
    """Refuse, before any work, an ``output`` holding anything but earlier views (which a new set replaces)."""
    if output.is_dir():
        others = [p.name for p in output.iterdir() if p.name != RECORD and not VIEW_FILE.fullmatch(p.name)]
        if others:
            raise UserError(f"--output {output} holds files other than views ({', '.join(sorted(others)[:3])}); "
                            f"choose a new or empty folder")


def clear_output(output: Path) -> None:
    """Remove earlier views from ``output`` (``views.json`` first: a folder without it is never taken for a
    complete set) and make sure it exists."""
    if output.is_dir():
        (output / RECORD).unlink(missing_ok=True)
        for path in output.iterdir():
            path.unlink()
    output.mkdir(parents=True, exist_ok=True)


def write_views(config: DistillConfig, count: int, output: str | Path) -> list[dict]:
    """Write the first ``count`` training views of a distillation with ``config``'s data, subset and seed settings.

    Args:
        config: the distillation's settings (teacher, data, subset, seed, epochs, cache views); nothing is trained
            and the teacher's weights are not read (its input size and mean/std come from its architecture).
        count: how many views; at most epochs x subset images (what the run shows), fewer are written beyond.
        output: the folder that receives ``view-000.png`` ... and ``views.json``.

    Returns:
        The ``views.json`` list: ``{"image", "box", "flip"}`` per view, in the order training shows them.

    Example:
        >>> config = DistillConfig(teacher="bundled", data="fashion-mnist", output="/tmp/views", ratio=0.001)
        >>> write_views(config, 16, "/tmp/views")[0].keys()  # doctest: +SKIP
        dict_keys(['image', 'box', 'flip'])
    """
    if count < 1:
        raise UserError(f"--count {count} is invalid: expected an integer >= 1")
    output = Path(output).expanduser()
    check_output(output)
    recipe = ViewRecipe.for_model(model_shape(config.teacher, img_size=config.img_size))
    subset = open_subset(config)  # the images distill trains on, by the same rule
    # Only a coreset needs the teacher's weights (its features choose the images).
    teacher = load_model(config.teacher, weights=config.teacher_weights,
                         img_size=config.img_size) if subset.choice.needs_features else None
    choose_subset(subset, teacher, "cpu")
    dataset, indices = subset.dataset, subset.indices
    store = open_store(dataset, indices, bound=recipe.bound, num_workers=loader_workers(config.num_workers),
                       cap=CacheCap.resolve(config.cache_max_gb, config.teacher_cache_dir))
    shown = config.epochs * len(indices)
    if count > shown:
        _logger.warning("a run of %d epochs over %d images shows %d views: writing those, not %d", config.epochs,
                        len(indices), shown, count)
        count = shown
    clear_output(output)
    n_views, generator, records = config.cache_views or config.epochs, torch.Generator(), []
    subset = np.asarray(indices, dtype=np.int64)
    for epoch in range(config.epochs):  # as distill: the order from seed + epoch, view epoch mod K
        generator.manual_seed(config.seed + epoch)
        view = epoch % n_views
        batches = StoreBatches(store, indices, recipe, seed=config.seed, view=view)
        for batch in store_loader(batches, config.batch_size, generator):
            positions = batch["positions"].numpy()[: count - len(records)]
            boxes, flips = recipe.params(config.seed, view, subset[positions], store.originals[positions])
            pixels = recipe.pixels(batch["pixels"][: len(positions)], batch["boxes"][: len(positions)],
                                   batch["flips"][: len(positions)])
            images = pixels.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
            for position, box, flip, image in zip(positions, boxes.tolist(), flips.tolist(), images):
                Image.fromarray(image).save(output / view_name(len(records), count))
                records.append({"image": image_source(dataset, int(subset[position]), config.data),
                                "box": [int(v) for v in box], "flip": bool(flip)})
            if len(records) == count:
                # Written last: a folder with views.json holds a complete set. One view a line.
                atomic_write_text(output / RECORD, "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
                _logger.info("%d views of %d images (epochs 1-%d) in %s", count, len(indices), epoch + 1, output)
                return records
    raise AssertionError("unreachable: count is at most what the run shows")
