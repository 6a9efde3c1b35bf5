"""Reproducible augmented views: view ``v`` of image ``i`` draws its RandomResizedCrop box and flip from a
generator seeded by (seed, v, i), on the ORIGINAL image's size, and :class:`ViewRecipe` cuts such views from
stored pixels on the device as torchvision's PIL pipeline would from the original (antialiased bicubic, taps
inside the box), with the teacher's mean/std."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from wecolora.data import augment
from wecolora.data.transforms import data_config


def view_seed(seed: int, view: int, index: int) -> int:
    """The augmentation seed of view ``view`` of dataset image ``index`` (63 bits, stable across runs).

    >>> view_seed(0, 1, 2) == view_seed(0, 1, 2) != view_seed(0, 2, 1)
    True
    """
    digest = hashlib.blake2b(f"wecolora-view:{seed}:{view}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def view_params(seed: int, view: int, indices, sizes, *, scale: tuple[float, float] = augment.SCALE,
                ratio: tuple[float, float] = augment.RATIO, hflip: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop boxes and flips of view ``view`` of dataset images ``indices`` whose original sizes are ``sizes``.

    Image ``i`` draws from its own generator, ``numpy.random.default_rng(view_seed(seed, view, i))``: 23 uniforms
    in [0, 1), ``u[0:10]`` the area fractions (``scale[0] + (scale[1] - scale[0]) * u``) and ``u[10:20]`` the log
    aspects of torchvision's 10 attempts, ``u[20]`` and ``u[21]`` the top and left, ``u[22] < hflip`` the flip.
    The box then follows ``torchvision.transforms.RandomResizedCrop.get_params`` exactly
<<<<<<< HEAD
    (:func:`wecolora.data.augment.boxes_from_draws`, float64), relative to the image's stored size. A view thus
    depends on neither the batch it is in, nor its order, nor the process.
=======
    (:func:`wecolora.augment.boxes_from_draws`, float64), on the image's original size: the box torchvision's
    ``RandomResizedCrop`` would draw on the original file. A view thus depends on neither the batch it is in, nor
    its order, nor the process, nor the size the image is stored at.
>>>>>>> wt-issue21

    Returns:
        ``(boxes [n, 4] float32 (top, left, height, width) in pixels, flips [n] bool)``.

    Example:
        >>> boxes, flips = view_params(0, 1, [5, 9], [[28, 28], [375, 500]])
        >>> boxes.shape, flips.dtype
        (torch.Size([2, 4]), torch.bool)
    """
    attempts = augment.ATTEMPTS
    draws = np.array([np.random.default_rng(view_seed(seed, view, int(i))).random(2 * attempts + 3) for i in indices],
                     dtype=np.float64).reshape(-1, 2 * attempts + 3)
    u = torch.from_numpy(draws)
    height, width = torch.as_tensor(np.asarray(sizes, dtype=np.float64).reshape(-1, 2)).unbind(1)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, :attempts]) * (height * width)[:, None]
    low, high = torch.log(torch.tensor(ratio)).tolist()  # float32 logs, as torchvision's get_params
    log_ratio = low + (high - low) * u[:, attempts:2 * attempts]
    boxes = augment.boxes_from_draws(area, log_ratio, u[:, 2 * attempts:2 * attempts + 2], height, width, ratio=ratio)
    return boxes.float(), u[:, 2 * attempts + 2] < hflip


def stored_boxes(boxes: torch.Tensor, originals, stored) -> torch.Tensor:
    """Boxes ``[n, 4]`` ``(top, left, height, width)`` on the originals (sizes ``[n, 2]``) -> the same regions on
    copies of sizes ``stored``: scaled per axis, fractional where a copy was shrunk, unchanged where it was not.

    >>> [round(v, 2) for v in stored_boxes(torch.tensor([[100., 40., 600., 300.]]), [[1000, 800]], [[579, 463]])[0].tolist()]
    [57.9, 23.15, 347.4, 173.62]
    """
    originals = torch.as_tensor(np.asarray(originals, dtype=np.float64).reshape(-1, 2))
    stored = torch.as_tensor(np.asarray(stored, dtype=np.float64).reshape(-1, 2))
    factor = (stored / originals).repeat(1, 2)  # [n, 4]: (y, x, y, x)
    return (boxes.double() * factor).float()


@dataclass(frozen=True)
class ViewRecipe:
    """The paper's augmentation of stored images, made on the device: RandomResizedCrop (scale 0.2-1, aspect
    3/4-4/3, bicubic) to the model's input size, a horizontal flip with probability 0.5, the model's mean/std.

    A view is what torchvision's PIL pipeline makes of the ORIGINAL image for the same box and flip
    (:func:`wecolora.data.augment.resized_crops`): the store keeps each image whole up to ``bound`` pixels on its
    short side (:func:`short_side_bound`), enough that every box the recipe can draw is cut from at least as many
    stored pixels as the view has, whenever the original has them.

    Its ``repr`` names the views in the teacher cache's key (with ``bound``: views are cut from the store).
    """
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bound: int
    scale: tuple[float, float] = augment.SCALE
    ratio: tuple[float, float] = augment.RATIO
    hflip: float = 0.5

    @classmethod
    def for_model(cls, model) -> ViewRecipe:
        """The recipe at the model's own input size and mean/std (its preprocessing config)."""
        cfg = data_config(model)
        size = tuple(int(s) for s in cfg["input_size"][1:])
        return cls(size, tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"]),
                   short_side_bound(size))

    def params(self, seed: int, view: int, indices, sizes) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`view_params` with this recipe's scale, aspect range and flip probability (``sizes``: the originals')."""
        return view_params(seed, view, indices, sizes, scale=self.scale, ratio=self.ratio, hflip=self.hflip)

    def pixels(self, images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """uint8 canvas rows ``[B, 3, Hc, Wc]`` and boxes on them -> views in [0, 1], ``[B, 3, *size]`` float32,
        before normalisation (what ``wecolora views`` writes)."""
        return augment.resized_crops(images, boxes, self.size, flip=flips).div_(255).clamp_(0, 1)

    def apply(self, pixels: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """uint8 canvas rows ``[B, 3, Hc, Wc]`` -> normalised float32 views ``[B, 3, *size]``, on their device."""
        return augment.normalize(self.pixels(pixels, boxes, flips), self.mean, self.std)


def short_side_bound(input_size: int | tuple[int, int], *, scale: tuple[float, float] = augment.SCALE,
                     ratio: tuple[float, float] = augment.RATIO) -> int:
    """The largest short side an image keeps in the store, for views of ``input_size`` pixels.

    A box of the recipe covers at least ``scale[0]`` of the image with an aspect within ``ratio``, so its shorter
    side is at least ``sqrt(scale[0] * min(ratio[0], 1 / ratio[1]))`` times the image's short side (0.387 at the
    paper's 0.2 and 3/4-4/3). A short side of ``input_size / 0.387`` thus leaves every box, even the smallest,
    at least ``input_size`` stored pixels a side: a view is never enlarged from the store where PIL would shrink
    it from the original. Images below the bound (most ImageNet photos, 500 x 375) are stored whole.

    >>> short_side_bound(224), short_side_bound((28, 28))
    (579, 73)
    """
    side = max(input_size) if isinstance(input_size, (tuple, list)) else input_size
    narrowest = math.sqrt(scale[0] * min(ratio[0], 1 / ratio[1]))
    return math.ceil(side / narrowest - 1e-9)
