"""Batched augmentation on the accelerator: torchvision's RandomResizedCrop + horizontal flip for a whole batch.

A PIL data loader crops one image at a time on the CPU (about 16k images/s for 28 px images), far below
what a tiny ViT trains at on a GPU. A dataset held in memory (the built-ins) is instead put on the device
once as a uint8 tensor, and each batch is cropped, resized and flipped there (:func:`resized_crops`: PIL's
antialiased bicubic resampling of each box, as two batched matrix products) with per-image boxes drawn as
torchvision draws them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SCALE = (0.2, 1.0)  # the paper's (and MAE's) RandomResizedCrop area range
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10  # torchvision's draws per box before its centred fallback


def stream_seed(*keys: int) -> int:
    """A seed for one random stream named by non-negative integers (seed, epoch, stream, process...).

    Distinct key tuples give unrelated streams (numpy's SeedSequence hashing), unlike ``seed + epoch``
    where seed 0 at epoch 1 would repeat seed 1 at epoch 0.
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)  # torch takes < 2**63


def sample_crop_boxes(n: int, height: int, width: int, *, scale: tuple[float, float] = SCALE,
                      ratio: tuple[float, float] = RATIO, generator: torch.Generator | None = None,
                      attempts: int = ATTEMPTS) -> torch.Tensor:
    """Crop boxes drawn like ``torchvision.transforms.RandomResizedCrop.get_params``, for ``n`` images at once.

    Returns:
        ``[n, 4]`` float boxes ``(top, left, height, width)`` in pixels (integers, as torchvision's).
    """
    device = generator.device if generator is not None else None
    area = torch.empty(n, attempts, device=device).uniform_(*scale, generator=generator) * (height * width)
    log_ratio = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                generator=generator)
    offsets = torch.rand(n, 2, device=device, generator=generator)
    return boxes_from_draws(area, log_ratio, offsets, height, width, ratio=ratio)


def boxes_from_draws(area: torch.Tensor, log_ratio: torch.Tensor, offsets: torch.Tensor, height, width, *,
                     ratio: tuple[float, float] = RATIO) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` given its random draws, for images of their own sizes.

    Each image tries its (area, log-aspect) draws in turn and takes the first whose box fits; if none fits,
    the whole image clipped to the aspect range, centred (torchvision's fallback).

    Args:
        area: ``[n, attempts]`` target areas in pixels (a uniform draw in the scale range times the image's area).
        log_ratio: ``[n, attempts]`` log aspect ratios (width / height), uniform in the log of ``ratio``.
        offsets: ``[n, 2]`` uniforms in [0, 1) choosing the top and left among the positions the box fits at
            (as ``torch.randint(0, size - crop + 1)``).
        height, width: the images' sizes, ``[n]`` tensors or numbers.

    Returns:
        ``[n, 4]`` boxes ``(top, left, height, width)`` in ``area``'s dtype, integer-valued.
    """
    n = area.shape[0]
    height = torch.as_tensor(height, dtype=area.dtype, device=area.device).expand(n)
    width = torch.as_tensor(width, dtype=area.dtype, device=area.device).expand(n)
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().round()
    h = (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])  # [n, attempts]
    first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 when none does)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    # torchvision's fallback: the largest centred box whose aspect is inside the range.
    in_ratio = width / height
    fallback_h = torch.where(in_ratio < ratio[0], (width / ratio[0]).round(), height)
    fallback_w = torch.where(in_ratio > ratio[1], (height * ratio[1]).round(), width)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    top = torch.where(found, (offsets[:, 0] * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(found, (offsets[:, 1] * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return torch.stack([top, left, h, w], dim=1)


def bicubic_filter(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """PIL's (and torch's antialiased) bicubic kernel, ``a = -0.5``: 1 at 0, 0 at every other integer and beyond 2."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, pixels: int, out: int, *,
                     reverse: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image matrices that resample the span ``[start, start + length)`` of ``pixels`` source pixels to ``out``
    pixels along one axis, as PIL's ``crop(box).resize(size, BICUBIC)`` does.

    PIL's separable resampling (``ImagingResample``): output pixel ``i`` is centred at ``start + (i + 0.5) * s`` with
    ``s = length / out``; its taps are the source pixels of the span (none outside it: PIL resamples the crop
    alone) within ``2 * max(s, 1)`` of that centre, weighted by the bicubic kernel stretched by ``max(s, 1)``
    (so a downscale averages every source pixel it covers: antialiasing), and normalised to sum to 1. A span
    with a fractional start or length (a box on a shrunk stored copy) is resampled the same way.

    Args:
        start, length: ``[B]`` span of each image in source pixels (float).
        pixels: source pixels along the axis (the canvas side); pixels past an image's own size are never taps.
        out: output pixels.
        reverse: ``[B]`` bool; True mirrors that image's output (a horizontal flip on the width axis).

    Returns:
        ``[B, out, pixels]`` float32 weights, on ``start``'s device.
    """
    start, length = start.float(), length.float()
    scale = length / out  # [B] source pixels per output pixel
    stretch = scale.clamp(min=1.0)[:, None, None]
    device = start.device
    centre = start[:, None] + (torch.arange(out, device=device) + 0.5) * scale[:, None]  # [B, out]
    # The taps of output i: at most 4 * stretch + 1 source pixels from floor(centre - 2 * stretch) on. The bound
    # takes the longest possible span (the whole axis), so no value is read back from the device.
    taps = 4 * math.ceil(max(1.0, pixels / out)) + 2
    first = (centre - 2 * stretch[:, :, 0]).floor()
    j = first[:, :, None] + torch.arange(taps, device=device)  # [B, out, taps] source pixel indices
    inside = (j + 0.5 > start[:, None, None]) & (j + 0.5 < (start + length)[:, None, None])  # the span's pixels only
    weights = bicubic_filter((j + 0.5 - centre[:, :, None]) / stretch) * inside
    weights = weights / weights.sum(dim=2, keepdim=True).clamp(min=1e-12)
    if reverse is not None:  # output i takes the taps of output out - 1 - i
        reverse = reverse.to(device)[:, None, None]
        j, weights = torch.where(reverse, j.flip(1), j), torch.where(reverse, weights.flip(1), weights)
    dense = torch.zeros(len(start), out, pixels, device=device)
    return dense.scatter_add_(2, j.long().clamp_(0, pixels - 1), weights)  # taps outside [0, pixels) weigh 0


DENSE_PIXELS = 128 * 128  # canvases up to this size are resampled by batched products on the CPU too


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int], *,
                  flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's box resized to ``size`` as torchvision's ``resized_crop(img, *box, size, BICUBIC)`` does on a
    PIL image (crop, then PIL's antialiased bicubic resize), optionally flipped.

    Unlike one ``grid_sample`` call (4 x 4 taps per output pixel, so a crop shrunk by more than about 2x skips
    source pixels and aliases: wecolora 0.3's views), every source pixel under a shrinking output pixel counts,
    and taps never reach outside the box. On an accelerator (and for small canvases) the whole batch is two batched
    matrix products with :func:`resample_weights`; on the CPU each image's box is resized alone (its cost is
    the box's, not the canvas's): an integer box by ``F.interpolate(antialias=True)``, PIL's algorithm in torch,
    a fractional one (a box on a shrunk stored copy) by its two products over the box.

    Args:
        images: ``[B, C, H, W]`` images, float or uint8 (each may fill only the top left of its canvas).
        boxes: ``[B, 4]`` ``(top, left, height, width)`` in pixels, inside each image.
        size: output size (an int for square).
        flip: ``[B]`` bool, True mirrors that image left-right.

    Returns:
        ``[B, C, *size]`` float32 on ``images``' device; bicubic overshoot is left to the caller to clamp.

    Example:
        >>> x = torch.rand(2, 3, 375, 500)
        >>> resized_crops(x, torch.tensor([[10., 20., 200., 260.], [0., 0., 375., 500.]]), 224).shape
        torch.Size([2, 3, 224, 224])
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    boxes = boxes.to(images.device).float()
    top, left, height, width = boxes.unbind(dim=1)
    if images.device.type != "cpu" or images.shape[2] * images.shape[3] <= DENSE_PIXELS:
        rows = resample_weights(top, height, images.shape[2], out_h)  # [B, out_h, H]
        cols = resample_weights(left, width, images.shape[3], out_w, reverse=flip).transpose(1, 2)  # [B, W, out_w]
        # [B, 1, out_h, H] @ [B, C, H, W] @ [B, 1, W, out_w]: the vertical pass, then the horizontal one.
        return torch.matmul(torch.matmul(rows[:, None], images.float()), cols[:, None])
    views = []
    for b, (t, l, h, w) in enumerate(boxes.tolist()):
        r0, c0 = math.floor(t), math.floor(l)
        r1, c1 = min(math.ceil(t + h), images.shape[2]), min(math.ceil(l + w), images.shape[3])
        crop = images[b:b + 1, :, r0:r1, c0:c1].float()
        if (r1 - r0, c1 - c0) == (h, w):  # an integer box: exactly PIL's resampling of the crop
            view = F.interpolate(crop, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False)[0]
        else:
            rows = resample_weights(top[b:b + 1] - r0, height[b:b + 1], r1 - r0, out_h)[0]
            cols = resample_weights(left[b:b + 1] - c0, width[b:b + 1], c1 - c0, out_w)[0]
            view = rows @ crop[0] @ cols.T
        views.append(view.flip(-1) if flip is not None and bool(flip[b]) else view)
    return torch.stack(views)


def normalize(images: torch.Tensor, mean, std, channels: int = 3) -> torch.Tensor:
    """Float images in [0, 1] -> ``(x - mean) / std`` per channel; a grey image becomes ``channels`` alike,
    as the PIL path's RGB conversion of a grey image."""
    if images.shape[1] == 1 and channels > 1:
        images = images.expand(-1, channels, -1, -1)
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def resize_normalize(images: torch.Tensor, size: int, mean, std, channels: int = 3) -> torch.Tensor:
    """uint8 ``[N, H, W]`` or ``[N, C, H, W]`` -> whole images resized to ``size`` (bicubic, as the model's
    eval preprocessing at crop 1.0) and normalised: evaluation inputs made on the device."""
    images = images if images.ndim == 4 else images[:, None]
    x = images.float() / 255
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    return normalize(x, mean, std, channels)


class DeviceCropLoader:
    """Training batches from a uint8 image tensor on the device: RandomResizedCrop + flip + normalise.

    Every epoch draws a permutation (the same on every process, from :meth:`set_seed`'s seed) and
    serves this process its share of each global batch, the incomplete last batch dropped, like a
    sharded ``DataLoader(drop_last=True)``. Crops and flips come from a per-process generator.

    Args:
        images: ``[N, H, W]`` or ``[N, C, H, W]`` uint8, already on the training device.
        batch_size: images per process and step.
        size: output image size.
        mean, std: per output channel (the model's normalisation).
        channels: output channels; a grey ``[N, H, W]`` set is repeated to 3 as the PIL path's RGB.

    Example:
        >>> loader = DeviceCropLoader(torch.zeros(100, 28, 28, dtype=torch.uint8), batch_size=32, size=28,
        ...                           mean=(0.3,) * 3, std=(0.3,) * 3)
        >>> loader.set_seed(0); [b.shape for b in loader]
        [torch.Size([32, 3, 28, 28]), torch.Size([32, 3, 28, 28]), torch.Size([32, 3, 28, 28])]
    """

    def __init__(self, images: torch.Tensor, *, batch_size: int, size: int, mean, std, channels: int = 3,
                 scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO, hflip: float = 0.5,
                 num_processes: int = 1, process_index: int = 0):
        self.images = images if images.ndim == 4 else images[:, None]  # [N, C, H, W]
        self.batch_size, self.size, self.channels = batch_size, size, channels
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.num_processes, self.process_index = num_processes, process_index
        device = images.device
        self.mean, self.std = mean, std
        self.order = torch.Generator(device=device)
        self.augment = torch.Generator(device=device)
        self.set_seed(0)

    def __len__(self) -> int:
        return len(self.images) // (self.batch_size * self.num_processes)

    def set_seed(self, seed: int) -> None:
        """Seed the next epoch: its order (shared by all processes) and this process's crops and flips."""
        self.order.manual_seed(stream_seed(seed, 0))
        self.augment.manual_seed(stream_seed(seed, 1, self.process_index))  # processes crop differently

    def augment_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> augmented, normalised float ``[B, channels, size, size]``."""
        b, _, height, width = images.shape
        boxes = sample_crop_boxes(b, height, width, scale=self.scale, ratio=self.ratio, generator=self.augment)
        flip = torch.rand(b, device=images.device, generator=self.augment) < self.hflip
        x = resized_crops(images, boxes, self.size, flip=flip).div_(255).clamp_(0, 1)
        return normalize(x, self.mean, self.std, self.channels)

    def __iter__(self):
        order = torch.randperm(len(self.images), device=self.images.device, generator=self.order)
        step = self.batch_size * self.num_processes
        for start in range(self.process_index * self.batch_size, len(self) * step, step):  # this process's share
            mine = order[start: start + self.batch_size]
            yield self.augment_batch(self.images[mine])
