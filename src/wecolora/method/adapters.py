"""Enhanced LoRA for timm ViT blocks: separate q, k, v adapters plus proj, fc1 and fc2, through peft.

timm fuses q, k and v into one ``attn.qkv`` Linear; peft on that Linear would learn ONE low-rank
update shared by all three (4·D·r parameters). The method needs three (6·D·r), so ``attn.qkv`` is
first split into a :class:`SplitQKV` of three Linears, peft wraps each, and after merging the three
are fused back into the plain timm Linear.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import re
from dataclasses import dataclass

import torch
from torch import nn

from wecolora.errors import UserError

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
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
) -> nn.Module:
    """Freeze ``model`` and add LoRA adapters on ``targets`` of every block; returns a peft model.

    Args:
        targets: names from :data:`TARGET_PATHS`, e.g. ``("q", "k", "v", "proj", "fc1", "fc2")``.
        rank: adapter rank r (A: r x in, B: out x r; B starts at zero so nothing changes yet).
        alpha: peft ``lora_alpha`` (the plan's: ``rank`` by default, i.e. scale 1 as in the paper).
    """
    from peft import LoraConfig, get_peft_model

    if not 0.0 <= dropout < 1.0:
        raise UserError(f"adapter dropout {dropout} must be in [0, 1)")
    if any(t in ("q", "k", "v") for t in targets):
        split_qkv(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
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
# Lean training path: the same function as the peft student, with fewer and larger matmuls and a backward
# that forms a frozen weight's gradient only where that is the cheaper way to the adapters' gradients.


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


@dataclass(frozen=True)
class OutputSlices:
    """How a :class:`LeanLoRALinear`'s output rows split into its base Linears, and the adapter on each."""
    rows: tuple[int, ...]  # output features of each slice, in order (q, k, v or a single one)
    scales: tuple[float | None, ...]  # each slice's adapter scale; None: no adapter on that slice

    def adapted(self) -> list[tuple[int, int, float]]:
        """``(first row, end row, scale)`` of each adapted slice, in the order of their A and B."""
        starts = itertools.accumulate(self.rows, initial=0)
        return [(start, start + rows, scale) for start, rows, scale in zip(starts, self.rows, self.scales)
                if scale is not None]


def delta_weight(slices: OutputSlices, lora_A: list[torch.Tensor], lora_B: list[torch.Tensor]) -> torch.Tensor:
    """ΔW ``[sum(rows), in]``: the stacked, scaled ``B_s A_s`` (zeros on slices without an adapter)."""
    scales = [s for s in slices.scales if s is not None]
    if (1 < len(lora_A) == len(slices.rows) and len({a.shape for a in lora_A}) == 1
            and len({b.shape for b in lora_B}) == 1):  # q, k, v: one batched matmul [3, out, r] x [3, r, in]
        delta = torch.bmm(torch.stack(lora_B), torch.stack(lora_A))
        if len(set(scales)) == 1:
            return delta.flatten(0, 1) if scales[0] == 1.0 else delta.flatten(0, 1) * scales[0]
        return (delta * torch.tensor(scales, device=delta.device, dtype=delta.dtype)[:, None, None]).flatten(0, 1)
    parts, pending = [], iter(zip(lora_A, lora_B, scales))
    like = lora_A[0]
    for rows, scale in zip(slices.rows, slices.scales):
        if scale is None:
            parts.append(torch.zeros(rows, like.shape[1], device=like.device, dtype=like.dtype))
            continue
        a, b, s = next(pending)
        parts.append(b @ a if s == 1.0 else (b @ a) * s)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def adapter_grad_flops(tokens: int, in_features: int, out_features: int, rank: int) -> dict[str, int]:
    """FLOPs of the two ways to get one adapter's ``(dA, dB)`` from its input X ``[T, in]`` and output gradient
    dY ``[T, out]`` (``y = scale · X Aᵀ Bᵀ``, A ``[r, in]``, B ``[out, r]``).

    ``thin``: U = X Aᵀ, dB = dYᵀ U, V = dY B, dA = Vᵀ X, four products with a side of r;
    ``full``: G = dYᵀ X (the frozen weight's gradient, ``[out, in]``), dB = G Aᵀ, dA = Bᵀ G.
    """
    return {"thin": 4 * tokens * rank * (in_features + out_features),
            "full": 2 * tokens * out_features * in_features + 4 * out_features * in_features * rank}


def grad_route(tokens: int, in_features: int, out_features: int, rank: int) -> str:
    """The route of :func:`adapter_grad_flops` that costs fewer FLOPs (``thin`` on a tie: no ``[out, in]`` buffer).

    >>> grad_route(197 * 128, 768, 3072, 128), grad_route(197 * 128, 768, 768, 768)
    ('thin', 'full')
    """
    flops = adapter_grad_flops(tokens, in_features, out_features, rank)
    return "thin" if flops["thin"] <= flops["full"] else "full"


def adapter_grads(route: str, x: torch.Tensor, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scale: float, *, need_a: bool = True, need_b: bool = True
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dA, dB)`` of ``y = scale · x Aᵀ Bᵀ`` for x ``[T, in]`` and dL/dy ``[T, out]``, by a route of
    :func:`adapter_grad_flops`; None for one not needed."""
    if route == "thin":
        da = (grad_out @ b).t() @ x if need_a else None
        db = grad_out.t() @ (x @ a.t()) if need_b else None
    elif route == "full":
        g = grad_out.t() @ x if need_a or need_b else None
        da = b.t() @ g if need_a else None
        db = g @ a.t() if need_b else None
    else:
        raise ValueError(f"unknown gradient route {route!r}; choose thin or full")
    if scale != 1.0:  # scaled on the small results, not on the [T, *] operands
        da, db = (None if t is None else t * scale for t in (da, db))
    return da, db


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer's matmuls run in: autocast's where it is on (as ``F.linear`` would), else x's."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _autocast_off(device: str):
    """A context running every op in the dtype it is given (the casts are explicit), on any device type."""
    if torch.amp.is_autocast_available(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


class _FrozenBaseLoRA(torch.autograd.Function):
    """``y = x (W + ΔW)ᵀ + b`` with W and b frozen: backward gives x and the adapters their gradients, and forms
    W's ``[out, in]`` gradient only where that is the cheaper route to them (:func:`grad_route`).

    Inputs ``x, W, b (or None), slices, *lora_A, *lora_B``. Autocast's dtype is applied by explicit casts (the
    backward then runs in the forward's dtype whatever thread or autocast state it runs in), and each gradient
    comes back in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, slices, *lora):
        dtype = _compute_dtype(x)
        ctx.slices, ctx.dtypes = slices, [x.dtype] + [p.dtype for p in lora]
        with _autocast_off(x.device.type):
            x = x.to(dtype)
            lora = [p.to(dtype) for p in lora]
            half = len(lora) // 2
            # summed in W's dtype and cast once, as autocast does with F.linear(x, W + ΔW)
            fused = (weight + delta_weight(slices, lora[:half], lora[half:])).to(dtype)
            y = nn.functional.linear(x, fused, None if bias is None else bias.to(dtype))
        # W + ΔW is kept for x's gradient rather than rebuilt: one weight-sized tensor per layer whatever the
        # batch, against a second ΔW product per step. Not kept where x needs no gradient (the first block).
        ctx.save_for_backward(x, fused if ctx.needs_input_grad[0] else None, *lora)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, fused, *lora = ctx.saved_tensors
        half = len(lora) // 2
        needs = ctx.needs_input_grad[4:]
        with _autocast_off(x.device.type):
            dy = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)  # [T, sum(rows)]
            x2d = x.reshape(-1, x.shape[-1])  # [T, in]
            grad_x = (dy @ fused).view(x.shape).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
            grads_a, grads_b = [], []
            for i, (start, end, scale) in enumerate(ctx.slices.adapted()):
                a, b = lora[i], lora[half + i]
                route = grad_route(x2d.shape[0], x2d.shape[1], end - start, a.shape[0])
                da, db = adapter_grads(route, x2d, dy[:, start:end], a, b, scale, need_a=needs[i],
                                       need_b=needs[half + i])
                grads_a.append(da)
                grads_b.append(db)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads_a + grads_b, ctx.dtypes[1:])]
        return grad_x, None, None, None, *grads


class LeanLoRALinear(nn.Module):
    """A frozen Linear plus low-rank updates on its output slices, computed as ONE matmul with W + B·A.

    ``y = x Wᵀ + b + Σ_s scale_s · B_s (A_s x)`` on output slice s, rewritten ``y = x (W + ΔW)ᵀ + b`` with
    ``ΔW`` stacked from the ``B_s A_s`` (one batched matmul for q, k and v). The forward then costs one
    input-sized matmul instead of a base matmul and two thin ones per slice, and the backward one for x's
    gradient plus the adapters' by the cheaper of two routes (:class:`_FrozenBaseLoRA`); the result equals the
    peft layers' up to float rounding. Parameters are the peft layers' own objects, so gradients land where
    the optimizer and ``save_pretrained`` expect them. Should a base weight train, plain autograd through
    ``W + ΔW`` gives it its gradient.
    """

    def __init__(self, bases: list[nn.Linear], updates: list[tuple[nn.Parameter, nn.Parameter, float] | None]):
        super().__init__()
        self.weights = nn.ParameterList([b.weight for b in bases])
        self.biases = nn.ParameterList([b.bias for b in bases if b.bias is not None])
        if self.biases and len(self.biases) != len(bases):
            raise ValueError("all slices must have a bias or none")
        self.lora_A = nn.ParameterList([u[0] for u in updates if u is not None])
        self.lora_B = nn.ParameterList([u[1] for u in updates if u is not None])
        self.slices = OutputSlices(tuple(b.out_features for b in bases),
                                   tuple(None if u is None else u[2] for u in updates))
        self._fused: dict[str, tuple[tuple, torch.Tensor]] = {}  # frozen slices concatenated once, see _concat

    def _concat(self, name: str, params: nn.ParameterList) -> torch.Tensor:
        """The slices' base weights (or biases) as one tensor; frozen ones are concatenated once and reused
        until a slice moves or is written to (its storage or version counter changes). Under torch.compile the
        stamp's pointer comparison would break the graph, so the compiled graph concatenates instead."""
        if len(params) == 1:
            return params[0]
        if torch.compiler.is_compiling() or any(p.requires_grad for p in params):
            return torch.cat(list(params))
        stamp = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._fused.get(name, (None,))[0] != stamp:
            with torch.no_grad():
                self._fused[name] = (stamp, torch.cat(list(params)))
        return self._fused[name][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._concat("weight", self.weights)
        bias = self._concat("bias", self.biases) if self.biases else None
        if not self.lora_A:
            return nn.functional.linear(x, weight, bias)
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return nn.functional.linear(x, weight + delta_weight(self.slices, list(self.lora_A), list(self.lora_B)),
                                        bias)
        return _FrozenBaseLoRA.apply(x, weight, bias, self.slices, *self.lora_A, *self.lora_B)


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
