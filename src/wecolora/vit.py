"""The timm VisionTransformer surface wecolora relies on: loading teachers and checking their layout.

A teacher is given as a spec string (``vit_base_patch16_224.mae``, ``local-dir:FOLDER``,
``hf-hub:ORG/NAME``, or a finished run / ``student`` folder) plus optional local weights.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

_logger = logging.getLogger(__name__)

# The small Fashion-MNIST teacher shipped with the package (see assets/teacher/RECIPE.md).
BUNDLED_TEACHER = Path(__file__).parent / "assets" / "teacher"

SUPPORTED_FAMILIES = "timm VisionTransformer models (vit_*, deit*, DINOv2, MAE, CLIP/SigLIP ViTs)"


def require_supported_vit(model: nn.Module) -> None:
    """Raise UserError unless ``model`` is a timm VisionTransformer with plain ``Block``/``Attention`` layout.

    The adapters wrap ``attn.qkv``; EVA/BEiT-style attention reads ``qkv.weight`` directly, which would
    make those adapters a silent no-op, so such families are refused here.
    """
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UserError(f"teacher is a {name}, not a timm VisionTransformer; supported: {SUPPORTED_FAMILIES}")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            raise UserError(
                f"block {i} of the teacher is {type(block).__name__}/{type(getattr(block, 'attn', None)).__name__}: "
                f"only the standard Block/Attention/Mlp layout is supported ({SUPPORTED_FAMILIES})"
            )
        if getattr(block.attn, "gate", None) is not None or getattr(block.attn, "attn_dim", block.attn.qkv.in_features) != block.attn.qkv.in_features:
            raise UserError(f"block {i} uses gated or widened attention, which wecolora does not support")
    if model.pos_embed is None:
        raise UserError("teachers without a learned position embedding (RoPE ViTs) are not supported")


def model_args(model: nn.Module) -> dict:
    """Arguments that rebuild ``model``'s architecture with ``timm.create_model(architecture, **args)``."""
    from timm.models import get_model_args

    args = get_model_args(model)
    args["depth"] = len(model.blocks)
    if isinstance(args.get("img_size"), tuple):
        args["img_size"] = list(args["img_size"])
    return args


def architecture(model: nn.Module) -> str:
    """The registered timm architecture name of ``model`` (without pretrained tag)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise UserError("the teacher has no timm pretrained_cfg['architecture']; create it with timm.create_model")
    return arch


def _resolve_spec(spec: str) -> str:
    """Turn ``bundled``, run folders and plain folders into timm's ``local-dir:`` form."""
    if spec == "bundled":
        if not (BUNDLED_TEACHER / "config.json").is_file():
            raise UserError(f"the bundled teacher is missing from this install ({BUNDLED_TEACHER})")
        return f"local-dir:{BUNDLED_TEACHER}"
    path = Path(spec)
    if spec.startswith(("local-dir:", "hf-hub:")) or not path.exists():
        return spec
    for candidate in (path / "student", path / "model", path):
        if (candidate / "config.json").is_file():
            return f"local-dir:{candidate}"
    raise UserError(f"{spec} is a folder without config.json: give a timm model folder, a run folder or a model name")


def load_model(spec: str, *, weights: str | None = None, img_size: int | None = None, num_classes: int | None = None,
               pretrained: bool = True) -> nn.Module:
    """Create a timm ViT from a spec, with pretrained weights from the spec or from a local file.

    Args:
        spec: timm name (``vit_small_patch16_224.dino``), ``local-dir:FOLDER``, ``hf-hub:ORG/NAME``, ``bundled``,
            or a folder holding ``config.json`` (a run folder resolves to its ``student/``).
        weights: optional local ``.safetensors``/``.pth`` loaded into that architecture through timm's
            pretrained path (handles MAE/DINOv2/CLIP layouts, pos-embed resize and head drop).
        img_size: optional input size override (pos-embed is resized by timm).
        num_classes: optional head size override (0 drops the head).
        pretrained: False builds the architecture only (random weights; no download, no file read).

    Returns:
        The model in eval mode on the CPU.
    """
    import timm

    spec = _resolve_spec(spec)
    kwargs = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is not None:
        weights_path = Path(weights)
        if not weights_path.is_file():
            raise UserError(f"--teacher-weights {weights} does not exist")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights_path.resolve()))
    source, _, name = spec.partition(":") if spec.startswith(("local-dir:", "hf-hub:")) else ("", "", spec)
    if source == "local-dir" and not Path(name).is_dir():
        raise UserError(f"model folder {name} does not exist")
    if not source and not timm.is_model(name.split(".")[0]):
        raise UserError(f"unknown model {spec!r}: not a timm model name, a folder, local-dir:FOLDER or hf-hub:ORG/NAME")
    try:
        model = timm.create_model(spec, pretrained=pretrained, **kwargs)
    except Exception as err:  # timm/hub raise many types; classify the ones a user can fix
        raise UserError(_explain_load_error(spec, weights, err)) from err
    require_supported_vit(model)
    return model.eval()


def _explain_load_error(spec: str, weights: str | None, err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    if "LocalEntryNotFound" in text or "offline" in text.lower() or "connect" in text.lower() or "url" in text.lower():
        return (f"cannot fetch pretrained weights for {spec!r} (offline?): pass --teacher-weights FILE, "
                f"a local-dir:FOLDER, or run once with network access to fill the Hugging Face cache")
    if weights:
        return f"cannot load {weights} into {spec}: {text}"
    return f"cannot load model {spec!r}: {text}"


def last_block_tokens(model: nn.Module, images: torch.Tensor, blocks: list[int] | None = None, *, norm: bool = False) -> list[torch.Tensor]:
    """All tokens (prefix + patches, ``[B, N, D]``) output by the given blocks (default: the last).

    ``norm=True`` applies the model's final norm to each, as timm's ``forward_features`` would.
    """
    indices = [len(model.blocks) - 1] if blocks is None else blocks
    outputs = model.forward_intermediates(
        images, indices=indices, norm=norm, output_fmt="NLC", intermediates_only=True,
        return_prefix_tokens=True, stop_early=True,
    )
    if not model.num_prefix_tokens:
        return list(outputs)
    return [torch.cat([prefix, patches], dim=1) for patches, prefix in outputs]
