"""Preprocessing from the model's own pretrained config (mean, std, input size, interpolation): the
paper's training augmentation and the evaluation transform, built with timm; the joint image + mask
transform of the dense probe, built with torchvision's v2 transforms."""
from __future__ import annotations

import numpy as np
import timm.data
import torch


def data_config(model) -> dict:
    """The model's own preprocessing (mean, std, crop) at the image size it actually takes."""
    cfg = timm.data.resolve_model_data_config(model)
    # create_model(img_size=...) leaves pretrained_cfg at the original size (224 for a 16 px ViT).
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        cfg["input_size"] = (cfg["input_size"][0], *img_size)
    return cfg


def train_transform(model):
    """The paper's augmentation: random resized crop (scale 0.2-1, bicubic), flip, the model's mean/std."""
    cfg = {**data_config(model), "interpolation": "bicubic"}
    # color_jitter=None leaves ColorJitter out (timm's default adds 0.4; 0 would add a no-op one).
    return timm.data.create_transform(
        **cfg, is_training=True, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
        color_jitter=None, auto_augment=None, re_prob=0.0,
    )  # fmt: skip


def eval_transform(model):
    """The model's evaluation preprocessing: resize, center crop at its input size, normalise."""
    return timm.data.create_transform(**data_config(model), is_training=False)


class SegmentationTransform:
    """Image + mask to the model's input size: the image resized with the model's interpolation and
    normalised with its mean/std, the mask resized with nearest neighbours (class indices stay indices).

    No crop: a dense probe scores every pixel of the image. Non-square images are stretched to the input size.
    """

    def __init__(self, size: tuple[int, int], mean, std, interpolation: str = "bicubic"):
        from torchvision import tv_tensors
        from torchvision.transforms import InterpolationMode, v2

        self.size, self.mean, self.std, self.interpolation = tuple(size), tuple(mean), tuple(std), interpolation
        self._image, self._mask = tv_tensors.Image, tv_tensors.Mask
        self.ops = v2.Compose([
            v2.Resize(self.size, interpolation=InterpolationMode(interpolation), antialias=True),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(self.mean, self.std),
        ])  # fmt: skip

    def __call__(self, image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(PIL RGB image, [H, W] uint8 mask)`` -> ``([3, h, w] float32, [h, w] uint8)`` at the input size."""
        from torchvision.transforms.v2.functional import pil_to_tensor

        pixels, labels = self.ops(self._image(pil_to_tensor(image)), self._mask(torch.from_numpy(np.asarray(mask))))
        return pixels.as_subclass(torch.Tensor), labels.as_subclass(torch.Tensor)

    def __repr__(self) -> str:  # part of the token cache's key
        return (f"SegmentationTransform(size={self.size}, interpolation={self.interpolation}, mean={self.mean}, "
                f"std={self.std})")


def segmentation_transform(model) -> SegmentationTransform:
    """The dense probe's transform for ``model``: its input size, interpolation, mean and std."""
    cfg = data_config(model)
    return SegmentationTransform(cfg["input_size"][1:], cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"))
