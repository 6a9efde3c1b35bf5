"""Teachers from Hugging Face ``transformers`` folders, converted into the equivalent timm VisionTransformer.

A folder saved with ``save_pretrained`` (``config.json`` with ``model_type`` vit, deit, vit_mae, dinov2 or
dinov2_with_registers, plus ``model.safetensors``) becomes a timm ``vit_base_patch16_224`` built with the
folder's sizes, so that the student, adapters, merge, export and probe see an ordinary timm teacher:

- q, k and v Linears are fused into timm's ``qkv``; DINOv2's LayerScale becomes ``ls1``/``ls2``;
- DeiT's distillation token and DINOv2's registers become timm register tokens (DeiT's share the position
  embedding, DINOv2's do not, as in each original);
- the MAE encoder is kept without its decoder and without masking; pooler, classifier and mask tokens
  are dropped (the teacher has no head);
- the position embedding is resized once, as transformers does at every forward, when the model runs at
  another size than its ``image_size`` (DINOv2: 518 px in config.json, 224 px in its preprocessing).

Standard library at import time (the CLI's checks use :func:`transformers_folder` and
:func:`check_folder`); torch, timm and transformers are imported by :func:`load` only.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from wecolora.errors import UserError

if TYPE_CHECKING:  # torch is imported by load() only
    import torch

_logger = logging.getLogger(__name__)

PREFIX = "hf-transformers:"
MODEL_TYPES = ("vit", "deit", "vit_mae", "dinov2", "dinov2_with_registers")
ARCHITECTURE = "vit_base_patch16_224"  # every size is overridden; its activation (exact GELU) is the one kept
TIMM_NORM_EPS = 1e-6  # timm ViTs' LayerNorm eps, the one a student built from the architecture name gets

# Preprocessing when the folder has no preprocessor_config.json: the defaults of the image processor
# transformers pairs with each type, at the model's own image_size (ViTImageProcessor: plain resize,
# mean/std 0.5, bilinear; DeiTImageProcessor: resize 256 + crop 224, ImageNet mean/std, bicubic;
# BitImageProcessor, DINOv2's: resize + crop of one size, CLIP mean/std, bicubic).
_HALF, _IMAGENET = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
DEFAULT_PREPROCESSING = {
    "vit": dict(stats=_HALF, crop_pct=1.0, resample=2),
    "vit_mae": dict(stats=_HALF, crop_pct=1.0, resample=2),
    "deit": dict(stats=_IMAGENET, crop_pct=224 / 256, resample=3),
    "dinov2": dict(stats=_CLIP, crop_pct=1.0, resample=3),
    "dinov2_with_registers": dict(stats=_CLIP, crop_pct=1.0, resample=3),
}
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes preprocessor_config.json uses

# Checkpoint keys that hold nothing the encoder computes with (pooler, heads, MAE decoder, mask tokens).
_IGNORED = ("pooler.", "classifier.", "cls_classifier.", "distillation_classifier.", "decoder.",
            "embeddings.mask_token")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return value


def transformers_folder(spec: str) -> Path | None:
    """The folder a spec names if it is a transformers model folder, else None.

    ``hf-transformers:FOLDER`` always names one; a plain folder is one when its ``config.json`` has a
    ``model_type`` and no timm ``architecture`` (timm folders hold ``architecture``, transformers' never).
    """
    if spec.startswith(PREFIX):
        return Path(spec[len(PREFIX):]).expanduser()
    path = Path(spec).expanduser()
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # left to the timm path, which reports the file
    return path if isinstance(value, dict) and "model_type" in value and "architecture" not in value else None


def check_folder(folder: Path, option: str = "--teacher") -> dict:
    """Refuse, in one line, a folder that cannot become a timm ViT; returns its config.json."""
    if not folder.is_dir():
        raise UserError(f"{option} {PREFIX}{folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"{option} {folder} has no config.json; give a folder saved with transformers' "
                        f"save_pretrained")
    config = _read_json(folder / "config.json")
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
        raise UserError(f"{option} {folder}: transformers model_type {kind!r} is not supported; supported: "
                        f"{', '.join(MODEL_TYPES)} (or convert it to a timm folder)")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise UserError(f"{option} {folder}: hidden_act {act!r} has no timm ViT equivalent here; only 'gelu' "
                        f"(exact GELU) is supported")
    if config.get("use_swiglu_ffn"):
        raise UserError(f"{option} {folder}: use_swiglu_ffn (DINOv2 giant's SwiGLU MLP) is not supported; only "
                        f"the standard GELU MLP is")
    if not _weight_files(folder):
        raise UserError(f"{option} {folder} has no model.safetensors (or model.safetensors.index.json); "
                        f"save the model with save_pretrained(..., safe_serialization=True)")
    return config


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [folder / name for name in shards]
    return []


def _auto_config(folder: Path):
    """The transformers config, with the defaults of its class for what an older config.json leaves out."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise UserError("transformers model folders need the transformers package: pip install "
                        "'wecolora[transformers]'") from None
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def _square(value, name: str, folder: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UserError(f"{folder}: non-square {name} {list(value)} is not supported")
        value = value[0]
    return int(value)


def _size(entry, default: int | None) -> int | None:
    """A preprocessor size entry (int, {height, width} or {shortest_edge}) as one side."""
    if entry is None:
        return default
    if isinstance(entry, int):
        return entry
    if "shortest_edge" in entry:
        return int(entry["shortest_edge"])
    if entry.get("height") != entry.get("width"):
        raise UserError(f"non-square preprocessing size {entry} is not supported")
    return int(entry["height"])


def preprocessing(folder: Path, model_type: str, image_size: int) -> dict:
    """timm ``pretrained_cfg`` fields (input size, mean, std, interpolation, crop_pct) of a folder.

    Read from ``preprocessor_config.json`` when present, else the defaults of the model type's image
    processor (:data:`DEFAULT_PREPROCESSING`) at the model's ``image_size``.
    """
    default = DEFAULT_PREPROCESSING[model_type]
    file = folder / "preprocessor_config.json"
    if file.is_file():
        values = _read_json(file)
        resize = _size(values.get("size"), None) if values.get("do_resize", True) else None
        crop = _size(values.get("crop_size"), None) if values.get("do_center_crop", False) else None
        side = crop or resize
        if side is None:
            raise UserError(f"{file} neither resizes nor crops: wecolora needs a fixed input size")
        # timm resizes the short side to size / crop_pct, then crops the center `size`.
        crop_pct = side / resize if crop and resize else 1.0
    else:
        values, side, crop_pct = {}, image_size, default["crop_pct"]
    mean = tuple(values.get("image_mean", default["stats"][0]))
    std = tuple(values.get("image_std", default["stats"][1]))
    resample = values.get("resample", default["resample"])
    if resample not in PIL_RESAMPLE:
        raise UserError(f"{file}: resample {resample!r} is not supported; use one of {sorted(PIL_RESAMPLE)} "
                        f"({', '.join(PIL_RESAMPLE.values())})")
    return {"input_size": (3, side, side), "mean": mean, "std": std, "interpolation": PIL_RESAMPLE[resample],
            "crop_pct": crop_pct, "crop_mode": "center"}


def timm_args(config, img_size: int | None = None, num_classes: int | None = None) -> dict:
    """``timm.create_model(ARCHITECTURE, **args)`` arguments of the equivalent ViT."""
    width, heads = config.hidden_size, config.num_attention_heads
    if width % heads:
        raise UserError(f"hidden_size {width} is not a multiple of num_attention_heads {heads}")
    if getattr(config, "model_type", "").startswith("dinov2"):
        hidden = int(width * config.mlp_ratio)  # DINOv2 ignores intermediate_size
    else:
        hidden = config.intermediate_size
    registers = {"deit": 1, "dinov2_with_registers": getattr(config, "num_register_tokens", 0)}.get(config.model_type, 0)
    return {
        "img_size": img_size,
        "patch_size": _square(config.patch_size, "patch_size", Path(config.name_or_path)),
        "in_chans": config.num_channels,
        "num_classes": 0 if num_classes is None else num_classes,
        "embed_dim": width,
        "depth": config.num_hidden_layers,
        "num_heads": heads,
        "mlp_ratio": hidden / width,
        "qkv_bias": bool(getattr(config, "qkv_bias", True)),
        "init_values": config.layerscale_value if config.model_type.startswith("dinov2") else None,
        "class_token": True,
        "reg_tokens": registers,
        # DINOv2's registers carry no position embedding; timm's no_embed_class leaves every prefix token
        # without one, so the class token's is folded into the token itself (see convert_state_dict).
        "no_embed_class": config.model_type == "dinov2_with_registers",
        "global_pool": "token",
    }


# Model types whose interpolate_pos_encoding antialiases (transformers' dinov2_with_registers passes
# antialias=True; vit, deit, vit_mae and plain dinov2 do not): a shrunk grid differs by a few percent otherwise.
ANTIALIASED_POSITIONS = ("dinov2_with_registers",)


def _resize_grid(pos: "torch.Tensor", grid: int, *, antialias: bool = False) -> "torch.Tensor":
    """Patch position embeddings ``[1, n*n, D]`` resized to ``[1, grid*grid, D]`` as transformers does at
    run time (bicubic, align_corners=False, float32; antialiased for :data:`ANTIALIASED_POSITIONS`)."""
    import torch.nn.functional as F

    n = int(round(pos.shape[1] ** 0.5))
    if n * n != pos.shape[1]:
        raise UserError(f"the position embedding holds {pos.shape[1]} patch positions, not a square grid")
    if n == grid:
        return pos
    image = pos.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()  # [1, D, n, n]
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    return image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)


def convert_state_dict(state: dict, config, grid: int) -> dict:
    """transformers encoder weights -> timm VisionTransformer state dict (no head).

    Args:
        state: the folder's tensors (any of ``vit.``/``deit.``/``dinov2.`` prefixes, heads, decoder).
        config: its transformers config.
        grid: patches per side of the timm model.
    """

    anchor = next((k for k in state if k.endswith("embeddings.cls_token")), None)
    if anchor is None:
        raise UserError("the checkpoint has no embeddings.cls_token: not a ViT encoder checkpoint")
    prefix = anchor[: -len("embeddings.cls_token")]
    source = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = [k for k in state if not k.startswith(prefix) or k[len(prefix):].startswith(_IGNORED)]
    source = {k: v for k, v in source.items() if not k.startswith(_IGNORED)}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in source:
            raise UserError(f"the checkpoint has no {prefix}{key}, which a {config.model_type} encoder needs")
        used.add(key)
        return source[key]

    out = _embeddings(take, config, grid)
    for i in range(config.num_hidden_layers):
        out.update(_block(take, config, i))
    out["norm.weight"] = take("layernorm.weight")
    out["norm.bias"] = take("layernorm.bias")
    unknown = sorted(set(source) - used)
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise UserError(f"the checkpoint holds weights with no timm ViT counterpart: {', '.join(unknown[:3])}{more}; "
                        f"this {config.model_type} variant is not supported")
    if ignored:
        _logger.info("transformers checkpoint: %d tensors of heads/decoder/mask tokens not used", len(ignored))
    return out


def _embeddings(take, config, grid: int) -> dict:
    """Class, register/distillation tokens, position embedding (patch grid resized) and patch embedding."""
    import torch

    out = {}
    pos = take("embeddings.position_embeddings")
    cls = take("embeddings.cls_token")
    if config.model_type == "dinov2_with_registers":
        out["cls_token"] = cls + pos[:, :1]
        out["pos_embed"] = _resize_grid(pos[:, 1:], grid, antialias=config.model_type in ANTIALIASED_POSITIONS)
        out["reg_token"] = take("embeddings.register_tokens")
    elif config.model_type == "deit":  # [cls, distillation, patches], each with its own position
        out["cls_token"] = cls
        out["reg_token"] = take("embeddings.distillation_token")
        out["pos_embed"] = torch.cat([pos[:, :2], _resize_grid(pos[:, 2:], grid)], dim=1)
    else:
        out["cls_token"] = cls
        out["pos_embed"] = torch.cat([pos[:, :1], _resize_grid(pos[:, 1:], grid)], dim=1)
    out["patch_embed.proj.weight"] = take("embeddings.patch_embeddings.projection.weight")
    out["patch_embed.proj.bias"] = take("embeddings.patch_embeddings.projection.bias")
    return out


def _block(take, config, i: int) -> dict:
    """Encoder layer ``i`` as timm's ``blocks.{i}``: q, k, v fused into ``qkv``; DINOv2's LayerScale as ls1/ls2."""
    import torch

    dinov2 = config.model_type.startswith("dinov2")
    names = ({"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"} if dinov2 else
             {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
              "mlp.fc2": "output.dense"})
    hf, timm_block = f"encoder.layer.{i}.", f"blocks.{i}."
    attention = hf + "attention.attention."
    out = {timm_block + "attn.qkv.weight": torch.cat([take(attention + f"{n}.weight") for n in ("query", "key", "value")])}
    if getattr(config, "qkv_bias", True):
        out[timm_block + "attn.qkv.bias"] = torch.cat([take(attention + f"{n}.bias") for n in ("query", "key", "value")])
    for kind in ("weight", "bias"):
        out[timm_block + f"attn.proj.{kind}"] = take(hf + f"attention.output.dense.{kind}")
        for timm_name, hf_name in names.items():
            out[timm_block + f"{timm_name}.{kind}"] = take(hf + f"{hf_name}.{kind}")
    if dinov2:
        out[timm_block + "ls1.gamma"] = take(hf + "layer_scale1.lambda1")
        out[timm_block + "ls2.gamma"] = take(hf + "layer_scale2.lambda1")
    return out


def _load_weights(model, folder: Path, config, *, grid: int, with_head: bool) -> None:
    """The folder's safetensors, converted to timm's layout, into ``model`` (a head of the asked size starts random)."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for file in _weight_files(folder):
        try:
            state.update(load_file(str(file)))
        except Exception as err:
            raise UserError(f"{file} is not a readable safetensors file: {type(err).__name__}: {err}") from None
    converted = convert_state_dict(state, config, grid)
    converted = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    if with_head:  # as timm's would, a new head starts random
        converted.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise UserError(f"{folder}: converted weights do not fit the timm ViT (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")


def load(folder: str | Path, *, img_size: int | None = None, num_classes: int | None = None,
         pretrained: bool = True, option: str = "--teacher"):
    """The timm VisionTransformer equivalent to a transformers ViT/DeiT/ViT-MAE/DINOv2 folder.

    Args:
        folder: the ``save_pretrained`` folder.
        img_size: input size (default: the preprocessing's, else config.json's ``image_size``); the
            position embedding is resized to it once, as transformers would at every forward.
        num_classes: head size (default 0: no head; transformers heads are not converted).
        pretrained: False builds the architecture only (use under ``torch.device('meta')`` for a check).

    Returns:
        The model in eval mode on the CPU; its ``pretrained_cfg`` holds the folder's preprocessing.

    Example:
        >>> teacher = load("dinov2-small")  # doctest: +SKIP
    """
    import timm
    from torch import nn

    folder = Path(folder).expanduser()
    check_folder(folder, option)
    config = _auto_config(folder)
    patch = _square(config.patch_size, "patch_size", folder)
    data_cfg = preprocessing(folder, config.model_type, _square(config.image_size, "image_size", folder))
    size = img_size or data_cfg["input_size"][-1]
    if size % patch:
        raise UserError(f"image size {size} is not a multiple of the {config.model_type} patch size {patch}: give an "
                        f"--img-size that is a multiple of {patch}")
    data_cfg["input_size"] = (config.num_channels, size, size)
    args = timm_args(config, img_size=size, num_classes=num_classes)
    overlay = dict(data_cfg, hf_hub_id=None, url=None, file=None, source="", num_classes=args["num_classes"])
    model = timm.create_model(ARCHITECTURE, pretrained=False, pretrained_cfg_overlay=overlay, **args)
    eps = float(config.layer_norm_eps)
    if eps != TIMM_NORM_EPS:
        # The teacher keeps transformers' eps so that it computes exactly what the original does; a student
        # rebuilt from the timm architecture gets timm's 1e-6 (a change of about eps / (2 * variance)
        # relative in each normalised activation, well below what training moves).
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = eps
        _logger.info("%s: LayerNorm eps %g kept in the teacher; students use timm's %g", folder, eps, TIMM_NORM_EPS)
    if not pretrained:
        return model.eval()
    _load_weights(model, folder, config, grid=size // patch, with_head=bool(args["num_classes"]))
    model.pretrained_cfg["file"] = str(folder.resolve())
    _logger.info("converted transformers %s folder %s into a timm ViT (%d blocks, width %d, %d px)",
                 config.model_type, folder, args["depth"], args["embed_dim"], size)
    return model.eval()
