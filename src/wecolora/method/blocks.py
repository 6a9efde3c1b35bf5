"""Which teacher blocks a student keeps under a fixed rule (``first``/``last``/a list), and which teacher
block each kept block stands for (its segment's end). Pure functions; the searched keeps are in
:mod:`wecolora.method.block_search`."""
from __future__ import annotations

from wecolora.config import KEEP_RULES, parse_keep
from wecolora.errors import UserError


def select_blocks(depth: int, reduction: int, keep: str | list[int] = "first") -> list[int]:
    """0-indexed teacher blocks the student keeps, for a rule or an explicit list.

    ``first`` keeps the first block of each group of ``reduction`` (the reference code),
    ``last`` the last of each full group (the paper's figure); a list is taken as given.
    The searched keeps (``auto``, ``greedy``, ``influence``) need images: see :func:`plan_student`.

    >>> select_blocks(12, 3, "first"), select_blocks(12, 3, "last")
    ([0, 3, 6, 9], [2, 5, 8, 11])
    """
    keep = parse_keep(keep)
    if not isinstance(keep, str):
        kept = sorted(set(keep))
        if kept[0] < 0 or kept[-1] >= depth:
            raise UserError(f"kept blocks {list(keep)} must be a non-empty list within 0..{depth - 1} (the teacher "
                            f"has {depth} blocks)")
        return kept
    check_reduction(depth, reduction)
    if keep == "first":
        return list(range(0, depth, reduction))
    if keep == "last":
        return list(range(reduction - 1, depth, reduction))
    raise UserError(f"keep {keep!r} chooses blocks from images: build its plan with plan_student(..., images=...) "
                    f"or give one of {', '.join(KEEP_RULES)} or a list of block indices")


def check_reduction(depth: int, reduction: int) -> int:
    """Number of blocks a reduction keeps, ceil(depth / r), after checking that r fits the teacher."""
    if not isinstance(reduction, int) or not 1 <= reduction < depth:
        raise UserError(f"reduction {reduction} is impossible for a {depth}-block teacher: choose 1 <= r < {depth}")
    return -(-depth // reduction)


def segment_ends(kept: list[int], depth: int, *, ends_at_kept: bool = False) -> list[int]:
    """Teacher block whose output student block i stands for: the end of the teacher segment it replaces.

    The kept blocks split the teacher into contiguous segments, one per kept block. By default a kept block
    starts its segment and answers for the dropped blocks after it, up to the teacher block just before the
    next kept one: the output the next copied block received in the teacher. With ``ends_at_kept`` (the
    ``last`` rule, the paper's groups) each kept block ends its own segment. Either way the last student
    block answers for the teacher's last block. The result depends on the list only, so an explicit
    ``--keep`` list reproduces a searched choice exactly.

    >>> segment_ends([0, 3, 6, 9], 12), segment_ends([2, 5, 8, 11], 12, ends_at_kept=True)
    ([2, 5, 8, 11], [2, 5, 8, 11])
    >>> segment_ends([0, 1, 4, 9], 12)
    [0, 3, 8, 11]
    """
    ends = list(kept) if ends_at_kept else [nxt - 1 for nxt in kept[1:]] + [depth - 1]
    ends[-1] = depth - 1
    return ends
