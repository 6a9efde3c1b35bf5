"""Feature-distillation objectives: which tokens are matched, and how far apart they are.

Default (the paper): L1 between the teacher's and the student's last-block outputs, before the final
norm, over all tokens (CLS + patches), mean over batch x tokens x channels.

A student narrower than the teacher (fewer residual channels) is compared either with the teacher's tokens
on the channels it kept (``kept``) or through a learned projection back to the teacher's width
(``projection``: :class:`WidthProjector`, trained with the student, dropped at export).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}

# match -> (per-block?, apply the final norm?)
MATCHES = {
    "last": (False, False),
    "last-norm": (False, True),
    "per-block": (True, False),
}


def matched_blocks(match: str, segment_ends: list[int]) -> tuple[list[int], list[int], bool]:
    """(student blocks, teacher blocks, norm) whose tokens the loss compares.

    ``segment_ends[i]`` is the teacher block whose output student block i stands for (the end of its
    segment, :attr:`wecolora.method.plan.StudentPlan.segment_ends`), for any kept list. ``per-block`` pairs
    every student block with it: for r=3 ``first`` that is teacher block 3i + 2, the pairing the reference
    code gets wrong. ``last``/``last-norm`` match the last student block with the teacher's last block.

    >>> matched_blocks("per-block", [2, 5, 8, 11]), matched_blocks("last", [0, 3, 8, 11])
    (([0, 1, 2, 3], [2, 5, 8, 11], False), ([3], [11], False))
    """
    per_block, norm = MATCHES[match]
    depth = len(segment_ends)
    if per_block:
        return list(range(depth)), list(segment_ends), norm
    return [depth - 1], [segment_ends[-1]], norm


def feature_loss(student_tokens: list[torch.Tensor], teacher_tokens: list[torch.Tensor], kind: str = "l1", *,
                 channels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Mean distance over matched token tensors (each ``[B, N, D]``), computed in fp32.

    ``channels``: the teacher channels a narrower student kept (``[D']`` indices, the ``kept`` width loss):
    the teacher's tokens are compared on those channels only.

    Returns ``{"loss": ..., kind: ...}`` plus ``{kind}_block{i}`` terms when several blocks are matched.
    """
    if channels is not None:
        teacher_tokens = [t.index_select(-1, channels) for t in teacher_tokens]  # [B, N, D] -> [B, N, D']
    distance = LOSSES[kind]
    terms = [distance(s.float(), t.float()) for s, t in zip(student_tokens, teacher_tokens, strict=True)]
    total = torch.stack(terms).mean()
    out = {"loss": total, kind: total.detach()}
    if len(terms) > 1:
        out.update({f"{kind}_block{i}": term.detach() for i, term in enumerate(terms)})
    return out


class WidthProjector(nn.Module):
    """The ``projection`` width loss: one learned ``Linear(D' -> D)`` per matched block, from the student's
    tokens to the teacher's width. It starts as the kept channels' embedding (weight 1 from student channel i
    to teacher channel ``channels[i]``, bias 0), so its first loss is the ``kept`` loss plus the dropped
    channels' magnitude; it trains with the student and is not part of the exported model.
    """

    def __init__(self, channels: list[int], teacher_width: int, blocks: int = 1):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(len(channels), teacher_width) for _ in range(blocks))
        with torch.no_grad():
            for linear in self.maps:
                linear.weight.zero_()
                linear.weight[torch.tensor(channels), torch.arange(len(channels))] = 1.0
                linear.bias.zero_()

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        return [linear(t) for linear, t in zip(self.maps, tokens, strict=True)]
