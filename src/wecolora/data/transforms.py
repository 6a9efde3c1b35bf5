"""Preprocessing from the model's own pretrained config (mean, std, input size, interpolation): the
paper's training augmentation and the evaluation transform, built with timm."""
from __future__ import annotations

import timm.data


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
