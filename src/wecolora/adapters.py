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


# ---------------------------------------------------------------------------------------------
# Lean training path: the same function as the peft student, with fewer and larger matmuls.


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s parameters, buffers and children (their dicts are copied)."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    clone._modules = dict(module._modules)
    return clone


def _lora_parts(layer: nn.Module) -> tuple[nn.Linear, tuple[nn.Parameter, nn.Parameter, float] | None] | None:
    """``(base Linear, (A, B, scale) or None)`` of a plain or peft-wrapped Linear; None if the lean path can't do it."""
    if type(layer) is nn.Linear:
        return layer, None
    base = getattr(layer, "base_layer", None)
    if type(base) is not nn.Linear or getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    active = list(getattr(layer, "active_adapters", ()))
    if len(active) != 1 or set(layer.lora_A) != {active[0]}:
        return None
    name = active[0]
    if (layer.use_dora.get(name) or getattr(layer, "lora_bias", {}).get(name)
            or not isinstance(layer.lora_dropout[name], nn.Identity)):
        return None
    return base, (layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]))


class LeanLoRALinear(nn.Module):
    """A frozen Linear plus low-rank updates on its output slices, computed as ONE matmul with W + B·A.

    ``y = x Wᵀ + b + Σ_s scale_s · B_s (A_s x)`` on output slice s, rewritten ``y = x (W + ΔW)ᵀ + b`` with
    ``ΔW`` stacked from the ``B_s A_s`` (one batched matmul for q, k and v). Forward and backward then cost
    one input-sized matmul each plus a weight gradient, instead of a base matmul and two thin ones per slice;
    the result equals the peft layers' up to float rounding. Parameters are the peft layers' own objects,
    so gradients land where the optimizer and ``save_pretrained`` expect them.
    """

    def __init__(self, bases: list[nn.Linear], updates: list[tuple[nn.Parameter, nn.Parameter, float] | None]):
        super().__init__()
        self.slice_out = [b.out_features for b in bases]
        self.weights = nn.ParameterList([b.weight for b in bases])
        self.biases = nn.ParameterList([b.bias for b in bases if b.bias is not None])
        if self.biases and len(self.biases) != len(bases):
            raise ValueError("all slices must have a bias or none")
        self.lora_A = nn.ParameterList([u[0] for u in updates if u is not None])
        self.lora_B = nn.ParameterList([u[1] for u in updates if u is not None])
        self.scales = [u[2] for u in updates if u is not None]
        self.adapted = [u is not None for u in updates]
        self._fused: dict[str, tuple[tuple, torch.Tensor]] = {}  # frozen slices concatenated once, see _concat
        self.stacked = all(self.adapted) and len(updates) > 1 and len({a.shape for a in self.lora_A}) == 1 \
            and len({b.shape for b in self.lora_B}) == 1

    def _concat(self, name: str, params: nn.ParameterList) -> torch.Tensor:
        """The slices' base weights (or biases) as one tensor; frozen ones are concatenated once and reused
        until a slice moves or is written to (its storage or version counter changes)."""
        if len(params) == 1:
            return params[0]
        if any(p.requires_grad for p in params):
            return torch.cat(list(params))
        stamp = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._fused.get(name, (None,))[0] != stamp:
            with torch.no_grad():
                self._fused[name] = (stamp, torch.cat(list(params)))
        return self._fused[name][1]

    def base_weight(self) -> torch.Tensor:
        return self._concat("weight", self.weights)

    def delta_weight(self) -> torch.Tensor:
        """ΔW ``[sum(out), in]``: the stacked, scaled ``B_s A_s`` (zeros on slices without an adapter)."""
        if self.stacked:  # q, k, v: one batched matmul [3, out, r] x [3, r, in]
            delta = torch.bmm(torch.stack(list(self.lora_B)), torch.stack(list(self.lora_A))).flatten(0, 1)
            if len(set(self.scales)) == 1:
                return delta if self.scales[0] == 1.0 else delta * self.scales[0]
            scale = torch.repeat_interleave(torch.tensor(self.scales, device=delta.device, dtype=delta.dtype),
                                            torch.tensor(self.slice_out, device=delta.device))
            return delta * scale[:, None]
        parts, j = [], 0
        for out, adapted in zip(self.slice_out, self.adapted):
            if adapted:
                a, b, s = self.lora_A[j], self.lora_B[j], self.scales[j]
                parts.append(b @ a if s == 1.0 else (b @ a) * s)
                j += 1
            else:
                parts.append(torch.zeros(out, self.weights[0].shape[1], device=self.weights[0].device,
                                         dtype=self.weights[0].dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_weight()
        if self.lora_A:
            weight = weight + self.delta_weight()
        return nn.functional.linear(x, weight, self._concat("bias", self.biases) if self.biases else None)


def _lean_linear(module: nn.Module) -> nn.Module | None:
    """The lean stand-in for a block's linear (plain, peft-wrapped or a SplitQKV of those); None if unsupported."""
    layers = [module.q, module.k, module.v] if isinstance(module, SplitQKV) else [module]
    parts = [_lora_parts(layer) for layer in layers]
    if any(p is None for p in parts):
        return None
    if all(u is None for _, u in parts):
        return module if not isinstance(module, SplitQKV) else LeanLoRALinear([b for b, _ in parts], [None] * 3)
    return LeanLoRALinear([b for b, _ in parts], [u for _, u in parts])


def lean_student(student: nn.Module) -> nn.Module:
    """A training view of a peft student: the same function and parameters, fused adapter matmuls.

    Returns a timm VisionTransformer whose blocks' linears are :class:`LeanLoRALinear` built from the
    student's own parameters (nothing is copied: the optimizer, checkpoints and ``save_pretrained`` keep
    working on ``student``). Students without adapters, and adapters the lean path does not implement
    (DoRA, dropout, several adapters), are returned unchanged.

    Example:
        >>> fast = lean_student(student)   # doctest: +SKIP
        >>> loss = fast(images).sum(); loss.backward()  # gradients land in student's lora_A / lora_B
    """
    if not has_adapters(student):
        return student
    base = student.get_base_model()
    blocks = []
    for block in base.blocks:
        lean_block = _shallow_copy(block)
        for path in ("attn", "mlp"):
            parent = _shallow_copy(getattr(block, path))
            for name in ("qkv", "proj") if path == "attn" else ("fc1", "fc2"):
                lean = _lean_linear(getattr(parent, name))
                if lean is None:
                    return student
                parent._modules[name] = lean
            lean_block._modules[path] = parent
        blocks.append(lean_block)
    lean = _shallow_copy(base)
    lean._modules["blocks"] = nn.Sequential(*blocks)
    return lean
