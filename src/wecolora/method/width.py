"""A narrower student: which residual channels, attention heads and MLP neurons it keeps, and the teacher's
weights sliced to them.

The student stays a plain timm ViT (``timm.create_model(arch, depth=k, embed_dim=D', num_heads=H',
mlp_ratio=M'/D')``): the residual channels are one set for the whole network (patch embedding, tokens,
position embedding, every norm and every block's inputs and outputs); every block keeps H' whole heads
(head size unchanged, so D' = H' x head size) and M' MLP neurons, possibly different ones per block.
Two rankings choose them:

- ``activation`` (Minitron's rules, on the teacher's activations over images of the few-shot subset):
  a channel by the summed magnitude of the LayerNorm outputs of the kept blocks (``norm1`` and ``norm2``),
  a head by the L2 norm of its output at the attention projection's input, a neuron by the magnitude at
  fc2's input, each summed over images and tokens; the highest scores are kept (ties: the lower index).
- ``uniform`` (Weight Selection's evenly spaced indices, no data): :func:`uniform_indices`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from wecolora.config import WIDTH_RANKINGS
from wecolora.errors import UserError


@dataclass(frozen=True)
class TeacherWidth:
    """The widths a teacher has: residual channels, heads and their size, MLP hidden neurons."""
    embed_dim: int
    heads: int
    head_dim: int
    mlp_hidden: int

    @classmethod
    def of(cls, teacher: nn.Module) -> TeacherWidth:
        attn, mlp = teacher.blocks[0].attn, teacher.blocks[0].mlp
        return cls(teacher.embed_dim, attn.num_heads, attn.head_dim, mlp.fc1.out_features)


@dataclass(frozen=True)
class StudentWidth:
    """The widths a student keeps (resolved from the settings by :func:`resolve_width`)."""
    embed_dim: int
    heads: int
    mlp_hidden: int

    def narrower_than(self, teacher: TeacherWidth) -> bool:
        return (self.embed_dim, self.heads, self.mlp_hidden) != (teacher.embed_dim, teacher.heads, teacher.mlp_hidden)


def resolve_width(teacher: TeacherWidth, *, embed_dim: int | None = None, heads: int | None = None,
                  mlp_hidden: int | None = None, width_ratio: float | None = None) -> StudentWidth:
    """The student's widths from the settings; what is not given stays the teacher's.

    Whole heads at the teacher's head size: ``embed_dim`` fixes the head count (D' = H' x head size), and
    ``heads`` the width. ``width_ratio`` w narrows both: round(w x H) heads (at least one) and round(w x M)
    neurons. Widths that do not fit the teacher are refused in one line with the valid choices.

    >>> t = TeacherWidth(embed_dim=48, heads=3, head_dim=16, mlp_hidden=192)
    >>> resolve_width(t, embed_dim=32), resolve_width(t, width_ratio=0.5)
    (StudentWidth(embed_dim=32, heads=2, mlp_hidden=192), StudentWidth(embed_dim=32, heads=2, mlp_hidden=96))
    """
    hd = teacher.head_dim
    choices = f"a multiple of the head size {hd} from {hd} to {teacher.embed_dim}"
    if width_ratio is not None:
        if embed_dim is not None or heads is not None or mlp_hidden is not None:
            raise UserError(f"--width-ratio {width_ratio:g} cannot be combined with --embed-dim, --heads or "
                            f"--mlp-hidden: give the ratio alone or the widths alone")
        if not 0 < width_ratio <= 1:
            raise UserError(f"--width-ratio {width_ratio!r} is invalid: expected a fraction in (0, 1]")
        heads = max(1, round(width_ratio * teacher.heads))
        mlp_hidden = max(1, round(width_ratio * teacher.mlp_hidden))
    for name, value in (("embed_dim", embed_dim), ("heads", heads), ("mlp_hidden", mlp_hidden)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"--{name.replace('_', '-')} {value!r} is invalid: expected a positive integer")
    if embed_dim is not None and (embed_dim % hd or embed_dim > teacher.embed_dim):
        raise UserError(f"--embed-dim {embed_dim} does not fit the teacher (width {teacher.embed_dim}, {teacher.heads} "
                        f"heads of {hd}): whole heads are kept, so choose {choices}")
    if heads is not None and heads > teacher.heads:
        raise UserError(f"--heads {heads} is more than the teacher's {teacher.heads}: choose 1 to {teacher.heads}")
    if embed_dim is not None and heads is not None and embed_dim != heads * hd:
        raise UserError(f"--embed-dim {embed_dim} and --heads {heads} disagree: heads keep the teacher's size {hd}, "
                        f"so give --embed-dim {heads * hd} with --heads {heads}, or --heads {embed_dim // hd} with "
                        f"--embed-dim {embed_dim} (or only one of them)")
    if mlp_hidden is not None and mlp_hidden > teacher.mlp_hidden:
        raise UserError(f"--mlp-hidden {mlp_hidden} is more than the teacher's {teacher.mlp_hidden} MLP neurons: "
                        f"choose 1 to {teacher.mlp_hidden}")
    heads = heads if heads is not None else (embed_dim // hd if embed_dim is not None else teacher.heads)
    return StudentWidth(heads * hd, heads, mlp_hidden if mlp_hidden is not None else teacher.mlp_hidden)


def uniform_indices(n: int, k: int) -> list[int]:
    """Weight Selection's evenly spaced indices: k of n (Xu et al., ICLR 2024, ``uniform_element_selection``).

    Where k divides n: ``0, s, 2s, ...`` with step s = n / k, as theirs. Otherwise theirs rounds
    ``linspace(0, n, k)``, whose last index is n, out of range; this rounds ``linspace(0, n - 1, k)``.

    >>> uniform_indices(12, 4), uniform_indices(128, 2), uniform_indices(10, 4)
    ([0, 3, 6, 9], [0, 64], [0, 3, 6, 9])
    """
    if not 1 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n}")
    if n % k == 0:
        return list(range(0, n, n // k))
    return torch.round(torch.linspace(0, n - 1, k, dtype=torch.float64)).long().tolist()


def top_indices(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest scores' indices, in increasing order; ties go to the lower index.

    >>> top_indices(torch.tensor([0.5, 0.0, 0.9, 0.5]), 2)
    [0, 2]
    """
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


@dataclass(frozen=True)
class WidthChoice:
    """What a narrower student keeps: teacher indices, per kept block for heads and neurons (student order)."""
    ranking: str  # activation | uniform
    channels: tuple[int, ...]
    heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]
    images: int = 0  # images the activation ranking looked at

    def record(self) -> dict:
        return {"ranking": self.ranking, "images": self.images, "channels": list(self.channels),
                "heads": [list(h) for h in self.heads], "neurons": [list(n) for n in self.neurons]}

    @classmethod
    def from_record(cls, record: dict) -> WidthChoice:
        """The choice a run recorded (``config.yaml`` ``resolved.width_selection``, ``adapter/wecolora.json``)."""
        return cls(ranking=record["ranking"], channels=tuple(record["channels"]),
                   heads=tuple(tuple(h) for h in record["heads"]),
                   neurons=tuple(tuple(n) for n in record["neurons"]), images=record.get("images", 0))

    def fits(self, width: StudentWidth, blocks: int) -> bool:
        return (len(self.channels) == width.embed_dim and len(self.heads) == len(self.neurons) == blocks
                and all(len(h) == width.heads for h in self.heads)
                and all(len(n) == width.mlp_hidden for n in self.neurons))


@torch.inference_mode()
def activation_scores(teacher: nn.Module, kept: list[int], images: torch.Tensor, *,
                      batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minitron's importance scores on the teacher's activations: ``(channels [D], heads [k, H], neurons [k, M])``.

    Channel c: sum over images, tokens and the kept blocks' ``norm1``/``norm2`` outputs of |x_c|; head h of
    kept block i: sum over images and tokens of the L2 norm of its slice of the attention projection's input;
    neuron j: sum of |x_j| at fc2's input. Summed in float64.
    """
    width = TeacherWidth.of(teacher)
    device = next(teacher.parameters()).device
    channels = torch.zeros(width.embed_dim, dtype=torch.float64, device=device)
    heads = torch.zeros(len(kept), width.heads, dtype=torch.float64, device=device)
    neurons = torch.zeros(len(kept), width.mlp_hidden, dtype=torch.float64, device=device)

    def add_channels(module, args, out):
        channels.add_(out.abs().sum(dim=(0, 1), dtype=torch.float64))

    def add_heads(i):
        def hook(module, args):
            x = args[0]  # [B, N, H * head size]
            heads[i].add_(x.unflatten(-1, (width.heads, width.head_dim)).norm(dim=-1).sum(dim=(0, 1), dtype=torch.float64))
        return hook

    def add_neurons(i):
        def hook(module, args):
            neurons[i].add_(args[0].abs().sum(dim=(0, 1), dtype=torch.float64))
        return hook

    handles = []
    try:
        for i, b in enumerate(kept):
            block = teacher.blocks[b]
            handles += [block.norm1.register_forward_hook(add_channels), block.norm2.register_forward_hook(add_channels),
                        block.attn.proj.register_forward_pre_hook(add_heads(i)),
                        block.mlp.fc2.register_forward_pre_hook(add_neurons(i))]
        was_training = teacher.training
        teacher.eval()
        try:
            for chunk in images.split(batch_size):
                teacher.forward_features(chunk.to(device, torch.float32))
        finally:
            teacher.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return channels.cpu(), heads.cpu(), neurons.cpu()


def choose_width(teacher: nn.Module, kept: list[int], width: StudentWidth, ranking: str,
                 images: torch.Tensor | None = None) -> WidthChoice:
    """The channels, heads and neurons a student of ``width`` keeps, by ``ranking`` (see the module docstring).

    Args:
        teacher: a timm VisionTransformer (with its weights, for ``activation``).
        kept: the teacher blocks the student keeps, in order.
        images: ``[N, C, H, W]`` preprocessed images of the few-shot subset, for ``activation``.
    """
    if ranking not in WIDTH_RANKINGS:
        raise UserError(f"unknown width ranking {ranking!r}; choose from {', '.join(WIDTH_RANKINGS)}")
    full = TeacherWidth.of(teacher)
    if ranking == "uniform":
        heads = tuple(uniform_indices(full.heads, width.heads))
        neurons = tuple(uniform_indices(full.mlp_hidden, width.mlp_hidden))
        return WidthChoice("uniform", tuple(uniform_indices(full.embed_dim, width.embed_dim)),
                           (heads,) * len(kept), (neurons,) * len(kept))
    if images is None or not len(images):
        raise UserError("the activation width ranking looks at images of the few-shot subset: pass images= (a few "
                        "hundred preprocessed images), or use width_ranking='uniform' (no data)")
    channel_scores, head_scores, neuron_scores = activation_scores(teacher, kept, images)
    return WidthChoice("activation", tuple(top_indices(channel_scores, width.embed_dim)),
                       tuple(tuple(top_indices(s, width.heads)) for s in head_scores),
                       tuple(tuple(top_indices(s, width.mlp_hidden)) for s in neuron_scores), images=len(images))


# ---------------------------------------------------------------------------------------------
# Slicing the teacher's tensors: for each parameter, which dimension takes which index set.
# c: residual channels, a: the kept heads' rows (their head-size slices), qkv: those rows in each of q, k
# and v, n: the kept MLP neurons. A tensor without a rule is refused rather than copied whole.

_TOP_RULES = {
    "cls_token": {-1: "c"}, "reg_token": {-1: "c"}, "pos_embed": {-1: "c"},
    "patch_embed.proj.weight": {0: "c"}, "patch_embed.proj.bias": {0: "c"},
    "patch_embed.norm.weight": {0: "c"}, "patch_embed.norm.bias": {0: "c"},
    "norm_pre.weight": {0: "c"}, "norm_pre.bias": {0: "c"},
    "norm.weight": {0: "c"}, "norm.bias": {0: "c"}, "fc_norm.weight": {0: "c"}, "fc_norm.bias": {0: "c"},
    "head.weight": {1: "c"}, "head.bias": {},
}
_BLOCK_RULES = {
    "norm1.weight": {0: "c"}, "norm1.bias": {0: "c"}, "norm2.weight": {0: "c"}, "norm2.bias": {0: "c"},
    "attn.qkv.weight": {0: "qkv", 1: "c"}, "attn.qkv.bias": {0: "qkv"},
    "attn.q_norm.weight": {}, "attn.q_norm.bias": {}, "attn.k_norm.weight": {}, "attn.k_norm.bias": {},
    "attn.norm.weight": {0: "a"}, "attn.norm.bias": {0: "a"},
    "attn.proj.weight": {0: "c", 1: "a"}, "attn.proj.bias": {0: "c"},
    "ls1.gamma": {0: "c"}, "ls2.gamma": {0: "c"},
    "mlp.fc1.weight": {0: "n", 1: "c"}, "mlp.fc1.bias": {0: "n"},
    "mlp.norm.weight": {0: "n"}, "mlp.norm.bias": {0: "n"},
    "mlp.fc2.weight": {0: "c", 1: "n"}, "mlp.fc2.bias": {0: "c"},
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def head_rows(heads: tuple[int, ...], head_dim: int) -> list[int]:
    """Rows of the kept heads in an attention-width tensor (each head a contiguous slice).

    >>> head_rows((0, 2), 2)
    [0, 1, 4, 5]
    """
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def slice_state_dict(state: dict[str, torch.Tensor], choice: WidthChoice, teacher: TeacherWidth) -> dict[str, torch.Tensor]:
    """A student-numbered state dict (``blocks.i`` = the i-th kept block) cut to the kept channels, heads and neurons.

    Raises UserError for a tensor this module has no rule for (an architecture it does not know how to narrow).
    """
    attn_dim = teacher.heads * teacher.head_dim
    channels = torch.tensor(choice.channels)
    out = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        rules = _BLOCK_RULES.get(match.group(2)) if match else _TOP_RULES.get(key)
        if rules is None:
            raise UserError(f"the teacher's tensor {key} has no rule for a narrower student: narrow students of this "
                            f"architecture are not supported (give no --embed-dim/--heads/--mlp-hidden/--width-ratio)")
        index = {"c": channels}
        if match:
            block = int(match.group(1))
            rows = head_rows(choice.heads[block], teacher.head_dim)
            index["a"] = torch.tensor(rows)
            index["qkv"] = torch.tensor([part * attn_dim + r for part in range(3) for r in rows])
            index["n"] = torch.tensor(choice.neurons[block])
        for dim, kind in rules.items():
            tensor = tensor.index_select(dim % tensor.dim(), index[kind].to(tensor.device))
        out[key] = tensor.contiguous()
    return out
