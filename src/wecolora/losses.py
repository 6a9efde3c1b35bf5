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


def matched_blocks(match: str, student_depth: int, teacher_group_ends: list[int]) -> tuple[list[int], list[int], bool]:
    """(student blocks, teacher blocks, norm) whose tokens the loss compares.

    ``per-block`` pairs student block i with the END of its teacher group (``teacher_group_ends[i]``),
    the pairing the reference code gets wrong for r=3.

    >>> matched_blocks("per-block", 4, [2, 5, 8, 11])
    ([0, 1, 2, 3], [2, 5, 8, 11], False)
    """
    per_block, norm = MATCHES[match]
    if per_block:
        return list(range(student_depth)), list(teacher_group_ends), norm
    return [student_depth - 1], [teacher_group_ends[-1]], norm


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
