"""The timm VisionTransformer surface wecolora relies on: loading teachers and checking their layout.

A teacher is given as a spec string (``vit_base_patch16_224.mae``, ``local-dir:FOLDER``,
``hf-hub:ORG/NAME``, ``bundled``, ``bundled-mae``, a finished run / ``student`` folder, or a transformers
model folder) plus optional local weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math

import torch
from torch import nn

from wecolora.errors import UserError
from wecolora.teachers.specs import BUNDLED_TEACHERS

_logger = logging.getLogger(__name__)

# The small Fashion-MNIST teachers shipped with the package (see assets/teacher*/RECIPE.md).
BUNDLED_TEACHER = BUNDLED_TEACHERS["bundled"]

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
    patch_embed = model.patch_embed
    img_size, patch = getattr(patch_embed, "img_size", None), patch_embed.patch_size
    if img_size is not None and any(i < p or i % p for i, p in zip(img_size, patch)):
        raise UserError(f"image size {tuple(img_size)} is not a multiple of the teacher's patch size {tuple(patch)}: "
                        f"give an --img-size that is a multiple of {patch[0]}")


def model_args(model: nn.Module) -> dict:
    """Arguments that rebuild ``model``'s architecture with ``timm.create_model(architecture, **args)``."""
    try:
        from timm.models import get_model_args  # timm >= 1.0.31 records the arguments a model was built with
    except ImportError:
        args = _args_from_modules(model)
    else:
        args = get_model_args(model)
    args["depth"] = len(model.blocks)
    if isinstance(args.get("img_size"), tuple):
        args["img_size"] = list(args["img_size"])
    return args


def mlp_ratio(embed_dim: int, mlp_hidden: int) -> float:
    """The ``mlp_ratio`` for which timm builds exactly ``mlp_hidden`` neurons (it takes ``int(dim * ratio)``).

    >>> int(7 * mlp_ratio(7, 61))
    61
    """
    ratio = mlp_hidden / embed_dim
    while int(embed_dim * ratio) < mlp_hidden:  # hidden / dim can round below: 7 * (61 / 7) = 60.99...
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _observed_args(model: nn.Module) -> dict:
    """The VisionTransformer constructor arguments that can be read back from its modules."""
    from timm.layers import LayerScale

    block = model.blocks[0]
    patch_embed = model.patch_embed
    width = model.embed_dim
    hidden = block.mlp.fc1.out_features
    img_size = getattr(patch_embed, "img_size", None)
    return {
        "img_size": list(img_size) if img_size is not None else None,
        "patch_size": list(patch_embed.patch_size),
        "in_chans": patch_embed.proj.in_channels,
        "num_classes": model.num_classes,
        "global_pool": model.global_pool,
        "embed_dim": width,
        "num_heads": block.attn.num_heads,
        "mlp_ratio": mlp_ratio(width, hidden),
        "qkv_bias": block.attn.qkv.bias is not None,
        "qk_norm": not isinstance(block.attn.q_norm, nn.Identity),
        "proj_bias": block.attn.proj.bias is not None,
        "layer_scale": isinstance(block.ls1, LayerScale),
        "class_token": model.cls_token is not None,
        "no_embed_class": model.no_embed_class,
        "reg_tokens": model.num_reg_tokens,
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "dynamic_img_size": model.dynamic_img_size,
    }


def _args_from_modules(model: nn.Module) -> dict:
    """:func:`model_args` for timm < 1.0.31, which does not record a model's arguments.

    The modules are compared with a weightless copy of the registered architecture and only what
    differs is returned, as timm's own record would be: what the architecture fixes beyond these
    arguments (activation, norm layer, embed layer) comes back from its name.
    """
    import inspect

    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not len(model.blocks):
        raise UserError("the model has no transformer blocks, so its architecture cannot be rebuilt")
    with torch.device("meta"):
        reference = timm.create_model(architecture(model), pretrained=False)
    observed, default = _observed_args(model), _observed_args(reference)
    accepted = inspect.signature(VisionTransformer.__init__).parameters
    args = {k: v for k, v in observed.items() if k in accepted and v != default[k]}
    if observed["layer_scale"] != default["layer_scale"]:
        # Only LayerScale's presence is architecture; its initial value matters only to a student that
        # starts from random weights (scratch-kd), so the value DINOv2 uses stands in for it.
        args["init_values"] = 1e-5 if observed["layer_scale"] else None
    if len(set(args.get("patch_size", ()))) == 1:
        args["patch_size"] = args["patch_size"][0]
    return args


def architecture(model: nn.Module) -> str:
    """The registered timm architecture name of ``model`` (without pretrained tag)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise UserError("the teacher has no timm pretrained_cfg['architecture']; create it with timm.create_model")
    return arch


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


def use_fused_attention(models: list[nn.Module], fused: bool) -> None:
    """Switch timm's fused attention kernel (``F.scaled_dot_product_attention``) on or off in every block.

    On the CPU the fused kernel's bf16 backward is about ten times slower than plain matmuls + softmax
    for short token sequences; the two compute the same attention.
    """
    for model in models:
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = fused


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's class, architecture arguments and every tensor of its state dict."""
    from wecolora.teachers.vit import model_args

    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(model).__qualname__.encode())
    # Shapes alone do not pin the architecture (the number of heads, for one), so hash its arguments too.
    digest.update(json.dumps(model_args(model), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()
