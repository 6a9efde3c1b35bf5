"""Feature-distillation objectives: which tokens are matched, and how far apart they are.

Default (the paper): L1 between the teacher's and the student's last-block outputs, before the final
norm, over all tokens (CLS + patches), mean over batch x tokens x channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def feature_loss(student_tokens: list[torch.Tensor], teacher_tokens: list[torch.Tensor], kind: str = "l1") -> dict[str, torch.Tensor]:
    """Mean distance over matched token tensors (each ``[B, N, D]``), computed in fp32.

    Returns ``{"loss": ..., kind: ...}`` plus ``{kind}_block{i}`` terms when several blocks are matched.
    """
    distance = LOSSES[kind]
    terms = [distance(s.float(), t.float()) for s, t in zip(student_tokens, teacher_tokens, strict=True)]
    total = torch.stack(terms).mean()
    out = {"loss": total, kind: total.detach()}
    if len(terms) > 1:
        out.update({f"{kind}_block{i}": term.detach() for i, term in enumerate(terms)})
    return out
