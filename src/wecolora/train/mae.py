"""Masked-autoencoder (MAE, He et al. 2022) pre-training around a timm VisionTransformer encoder.

This is how the self-supervised ``bundled-mae`` teacher is made (``wecolora pretrain --objective mae``).
It is written here on top of timm rather than with transformers' ``ViTMAEForPreTraining`` because the
encoder then IS the timm ``VisionTransformer`` that ``wecolora distill`` copies blocks from: its weights
are saved as a headless timm folder with no conversion step, and its forward on a full image is timm's
``forward_features``.

Pieces, top to bottom: :func:`patchify` (the pixel targets), :func:`random_masking` (which patches the
encoder sees), :func:`encode` (the timm encoder over the visible patches only), MAE's encoder set-up
(:func:`fix_sincos_positions`: fixed 2-D sine-cosine positions; :func:`mae_init`: its initialisation),
:class:`MaeDecoder` (a small ViT that predicts the pixels of every patch) and :class:`MaskedAutoencoder` (the loss).
"""
from __future__ import annotations

import torch
from torch import nn

from wecolora.config import decoder_heads
from wecolora.errors import UserError


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` images -> ``[B, N, p*p*C]`` patches in row-major patch order (timm's token order).

    Example:
        >>> patchify(torch.zeros(2, 3, 28, 28), 7).shape
        torch.Size([2, 16, 147])
    """
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)  # [B, C, gh, p, gw, p]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]: each patch's pixels row by row, channels last (as MAE)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def kept_count(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: ``round(N * (1 - mask_ratio))``; at least one patch seen and one hidden."""
    keep = round(num_patches * (1 - mask_ratio))
    if not 0 < keep < num_patches:
        raise UserError(f"--mask-ratio {mask_ratio} leaves {keep} of {num_patches} patches visible; the encoder needs "
                        f"at least one visible and the loss at least one masked patch: choose a ratio in "
                        f"({0.5 / num_patches:.3g}, {1 - 0.5 / num_patches:.3g})")
    return keep


def random_masking(batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-image random masking: sort uniform noise, keep the patches with the smallest noise.

    Args:
        batch, num_patches: B and N.
        mask_ratio: share of the patches hidden from the encoder.
        generator: seeds the noise (on ``device``), so a run's masks are reproducible.

    Returns:
        ``(keep, mask)``: ``keep`` ``[B, K]`` visible patch indices (in noise order, as MAE's shuffle),
        ``mask`` ``[B, N]`` bool, True where a patch is hidden. ``K = round(N * (1 - mask_ratio))``.
    """
    if generator is not None:
        device = generator.device
    keep_n = kept_count(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    keep = noise.argsort(dim=1)[:, :keep_n]
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, keep, False)
    return keep, mask


def require_maskable(model: nn.Module) -> None:
    """Refuse the timm ViT variants :func:`encode` cannot run on a subset of patches."""
    name = type(model).__name__
    if getattr(model, "pos_embed", None) is None:
        raise UserError(f"{name} has no learned position embedding (RoPE?): MAE pre-training needs one; "
                        f"choose a plain vit_* architecture with --model")
    if getattr(model, "dynamic_img_size", False):
        raise UserError("MAE pre-training needs a fixed image size; create the model without dynamic_img_size")
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        raise UserError("MAE pre-training masks patches itself; create the model without patch_drop_rate")
    if getattr(model, "cls_token", None) is None:
        raise UserError(f"{name} has no class token; the MAE path monitors and distills the CLS feature: choose "
                        f"an architecture with class_token=True")


def prefix_tokens(model: nn.Module, batch: int) -> torch.Tensor:
    """The class (and register) tokens with their position embeddings, ``[B, P, D]``."""
    tokens = [model.cls_token]
    if getattr(model, "reg_token", None) is not None:
        tokens.append(model.reg_token)
    prefix = torch.cat(tokens, dim=1)  # [1, P, D]
    if not model.no_embed_class:  # the original ViT layout: the first P position embeddings belong to them
        prefix = prefix + model.pos_embed[:, : model.num_prefix_tokens]
    return prefix.expand(batch, -1, -1)


def encode(model: nn.Module, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """timm's ``forward_features`` on the visible patches only: ``[B, P + K, D]`` after the final norm.

    The same steps as ``VisionTransformer.forward_features`` (patch embed, position embedding, prefix
    tokens, ``norm_pre``, blocks, ``norm``), with the patch tokens gathered at ``keep`` before the blocks,
    so masked patches cost nothing. ``keep=None`` keeps every patch in order: exactly ``forward_features``.
    """
    x = model.patch_embed(images)  # [B, N, D]
    patch_pos = model.pos_embed if model.no_embed_class else model.pos_embed[:, model.num_prefix_tokens:]
    x = x + patch_pos
    if keep is not None:
        x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, D]
    x = torch.cat([prefix_tokens(model, x.shape[0]), x], dim=1)
    x = model.norm_pre(model.pos_drop(x))
    x = model.blocks(x)
    return model.norm(x)


def sincos_pos_embed(grid: tuple[int, int], dim: int, option: str = "--decoder-dim") -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embedding, ``[gh * gw, dim]`` (half the channels per axis)."""
    if dim % 4:
        raise UserError(f"{option} {dim} is invalid: expected a multiple of 4 (sine and cosine per axis)")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")

    def axis(positions):
        angles = positions.reshape(-1, 1) * omega  # [N, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()  # MAE puts the width axis first


def fix_sincos_positions(encoder: nn.Module) -> None:
    """Give a timm ViT MAE's fixed encoder positions: 2-D sine-cosine for the patches, zeros for the class (and
    register) tokens where they have positions, never trained (``requires_grad`` off, as MAE's)."""
    grid = tuple(encoder.patch_embed.grid_size)
    patches = sincos_pos_embed(grid, encoder.embed_dim, "--embed-dim")  # [N, D]
    prefix = encoder.pos_embed.shape[1] - patches.shape[0]  # 0 with no_embed_class
    with torch.no_grad():
        encoder.pos_embed.copy_(torch.cat([torch.zeros(prefix, encoder.embed_dim), patches])[None])
    encoder.pos_embed.requires_grad_(False)


def mae_init(encoder: nn.Module) -> None:
    """MAE's ``initialize_weights`` on a timm ViT: the patch projection xavier-uniform as a flattened Linear,
    every Linear xavier-uniform with zero bias, LayerNorms at weight 1 and bias 0, the class (and register)
    tokens normal with std 0.02 (timm's own init: truncated normal 0.02 Linears, class token at 1e-6)."""
    with torch.no_grad():
        weight = encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for module in encoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name in ("cls_token", "reg_token"):
            token = getattr(encoder, name, None)
            if token is not None:
                nn.init.normal_(token, std=0.02)


class MaeDecoder(nn.Module):
    """MAE's light decoder: project the visible tokens, fill in a shared mask token, a few timm ``Block``s,
    LayerNorm, and a Linear to each patch's pixels. Discarded after pre-training."""

    def __init__(self, *, embed_dim: int, num_prefix: int, grid: tuple[int, int], patch_pixels: int,
                 dim: int = 64, depth: int = 4):
        from timm.models.vision_transformer import Block

        super().__init__()
        self.num_prefix = num_prefix
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed, not learned (as MAE): prefix tokens get zeros, patches their 2-D sin-cos position.
        pos = torch.cat([torch.zeros(num_prefix, dim), sincos_pos_embed(grid, dim)])
        self.register_buffer("pos_embed", pos[None], persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, decoder_heads(dim), mlp_ratio=4.0, qkv_bias=True)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():  # MAE's init: xavier-uniform linears, zero biases
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, latent: torch.Tensor, keep: torch.Tensor, num_patches: int) -> torch.Tensor:
        """``latent`` ``[B, P + K, D]`` encoder output -> ``[B, N, patch_pixels]`` predicted pixels."""
        x = self.embed(latent)  # [B, P + K, d]
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix:]
        # Every patch position starts as the mask token; the visible ones are put back where they came from.
        patches = self.mask_token.to(x.dtype).expand(x.shape[0], num_patches, -1)
        patches = patches.scatter(1, keep[..., None].expand(-1, -1, x.shape[-1]), visible)  # [B, N, d]
        x = torch.cat([prefix, patches], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.num_prefix:])


class MaskedAutoencoder(nn.Module):
    """A timm ViT ``encoder`` (trained, later saved alone) and an :class:`MaeDecoder` (discarded).

    Example:
        >>> encoder = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, embed_dim=128,
        ...                             num_heads=4, num_classes=0)
        >>> mae = MaskedAutoencoder(encoder)
        >>> mae(torch.randn(8, 3, 28, 28))["loss"]  # hides 12 of the 16 patches of each image
    """

    def __init__(self, encoder: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 64,
                 decoder_depth: int = 4, norm_pix_loss: bool = True):
        super().__init__()
        require_maskable(encoder)
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.num_patches = encoder.patch_embed.num_patches
        kept_count(self.num_patches, mask_ratio)  # refuse a ratio that leaves nothing to see or to predict
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.decoder = MaeDecoder(embed_dim=encoder.embed_dim, num_prefix=encoder.num_prefix_tokens,
                                  grid=tuple(encoder.patch_embed.grid_size),
                                  patch_pixels=self.patch_size ** 2 * encoder.patch_embed.proj.in_channels,
                                  dim=decoder_dim, depth=decoder_depth)

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps free of weight decay (besides biases and norms): the
        encoder's own list (position embedding, class and register tokens) and the mask token."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()} | {"decoder.mask_token"}

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """``{'loss'}`` of a batch ``[B, C, H, W]`` of preprocessed images under a fresh random mask."""
        keep, mask = random_masking(images.shape[0], self.num_patches, self.mask_ratio, generator,
                                    device=images.device)
        prediction = self.decoder(encode(self.encoder, images, keep), keep, self.num_patches)
        return {"loss": reconstruction_loss(prediction, patchify(images, self.patch_size), mask,
                                            norm_pix=self.norm_pix_loss)}


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                        norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches only (visible ones are free to copy).

    Args:
        prediction, target: ``[B, N, p*p*C]``.
        mask: ``[B, N]`` bool, True where the patch was hidden.
        norm_pix: normalise each target patch by its own mean and variance (MAE's better-representation
            variant: the decoder predicts local contrast, not absolute brightness).
    """
    target = target.float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (prediction.float() - target).pow(2).mean(dim=-1)  # [B, N]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()

