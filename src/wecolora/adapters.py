"""Enhanced LoRA for timm ViT blocks: separate q, k, v adapters plus proj, fc1 and fc2, through peft.

timm fuses q, k and v into one ``attn.qkv`` Linear; peft on that Linear would learn ONE low-rank
update shared by all three (4·D·r parameters). The method needs three (6·D·r), so ``attn.qkv`` is
first split into a :class:`SplitQKV` of three Linears, peft wraps each, and after merging the three
are fused back into the plain timm Linear.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .errors import UserError

# Where each adapter target lives inside a timm ``Block`` once qkv is split.
TARGET_PATHS = {
    "q": "attn.qkv.q",
    "k": "attn.qkv.k",
    "v": "attn.qkv.v",
    "proj": "attn.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


class SplitQKV(nn.Module):
    """A fused ``qkv`` Linear held as three Linears (``q``, ``k``, ``v``) with the same output."""

    def __init__(self, qkv: nn.Linear):
        super().__init__()
        width = qkv.out_features // 3
        has_bias = qkv.bias is not None
        self.q, self.k, self.v = (nn.Linear(qkv.in_features, width, bias=has_bias) for _ in range(3))
        with torch.no_grad():
            for i, linear in enumerate((self.q, self.k, self.v)):
                linear.to(device=qkv.weight.device, dtype=qkv.weight.dtype)
                linear.weight.copy_(qkv.weight[i * width:(i + 1) * width])
                if has_bias:
                    linear.bias.copy_(qkv.bias[i * width:(i + 1) * width])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, D] -> [B, N, 3*D] in timm's (q, k, v) order
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def fuse(self) -> nn.Linear:
        """One Linear equal to this module (adapters must already be merged)."""
        parts = (self.q, self.k, self.v)
        if not all(type(p) is nn.Linear for p in parts):
            raise RuntimeError("merge the adapters before fusing q, k, v")
        fused = nn.Linear(self.q.in_features, 3 * self.q.out_features, bias=self.q.bias is not None)
        fused.to(device=self.q.weight.device, dtype=self.q.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        return fused


def split_qkv(model: nn.Module) -> None:
    """Replace every block's ``attn.qkv`` with a :class:`SplitQKV`, in place."""
    for block in model.blocks:
        if isinstance(block.attn.qkv, nn.Linear):
            block.attn.qkv = SplitQKV(block.attn.qkv)


def fuse_qkv(model: nn.Module) -> None:
    """Undo :func:`split_qkv`, in place."""
    for block in model.blocks:
        if isinstance(block.attn.qkv, SplitQKV):
            block.attn.qkv = block.attn.qkv.fuse()


def target_regex(targets: tuple[str, ...]) -> str:
    """peft ``target_modules`` regex matching only the given targets inside ``blocks``.

    Dotted paths matter: a bare ``proj`` would also catch ``patch_embed.proj``.
    """
    unknown = set(targets) - set(TARGET_PATHS)
    if unknown:
        raise UserError(f"unknown adapter target(s) {sorted(unknown)}; choose from {list(TARGET_PATHS)}")
    paths = "|".join(re.escape(TARGET_PATHS[t]) for t in targets)
    return rf"blocks\.\d+\.(?:{paths})"


def add_adapters(
        model: nn.Module,
        targets: tuple[str, ...],
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
) -> nn.Module:
    """Freeze ``model`` and add LoRA adapters on ``targets`` of every block; returns a peft model.

    Args:
        targets: names from :data:`TARGET_PATHS`, e.g. ``("q", "k", "v", "proj", "fc1", "fc2")``.
        rank: adapter rank r (A: r x in, B: out x r; B starts at zero so nothing changes yet).
        alpha: peft ``lora_alpha``; default ``rank``, i.e. scale 1 as in the paper.
    """
    from peft import LoraConfig, get_peft_model

    width = model.embed_dim
    if not 1 <= rank <= width:
        raise UserError(f"rank {rank} is impossible for width {width}: choose 1 <= rank <= {width}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"adapter dropout {dropout} must be in [0, 1)")
    if any(t in ("q", "k", "v") for t in targets):
        split_qkv(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_regex(targets),
        use_dora=use_dora,
        use_rslora=use_rslora,
        init_lora_weights=True,  # A: kaiming-uniform (nn.Linear's default), B: zeros
        bias="none",
    )
    return get_peft_model(model, config)


def has_adapters(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge(student: nn.Module) -> nn.Module:
    """A plain timm VisionTransformer equal to ``student``, adapters folded into the weights.

    The student is left untouched (it is copied first). Merging refuses non-finite weights.

    Example:
        >>> plain = wecolora.merge(student)   # doctest: +SKIP
        >>> plain(images)  # same outputs, no adapter overhead
    """
    if not has_adapters(student):
        return copy.deepcopy(student)
    try:
        merged = copy.deepcopy(student).merge_and_unload(safe_merge=True)
    except ValueError as err:  # peft's safe_merge finite check
        raise UserError(f"cannot merge the adapters: {err} (non-finite adapter weights: did the run diverge?)") from err
    fuse_qkv(merged)
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged
