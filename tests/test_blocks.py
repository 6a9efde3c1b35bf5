"""Tests for wecolora.method.blocks: which teacher blocks a rule keeps, the segments they stand for,
and which reductions fit a teacher."""
import pytest

from wecolora.errors import UserError
from wecolora.config import KEEP_RULES
from wecolora.method.blocks import check_reduction, segment_ends, select_blocks

SELECT_CASES = [
    # depth, reduction, keep, kept blocks
    (12, 3, "first", [0, 3, 6, 9]),
    (12, 3, "last", [2, 5, 8, 11]),
    (12, 2, "first", [0, 2, 4, 6, 8, 10]),
    (12, 2, "last", [1, 3, 5, 7, 9, 11]),
    (12, 5, "first", [0, 5, 10]),  # a last partial group keeps its first block
    (12, 5, "last", [4, 9]),  # ... but has no last block of a full group
    (6, 1, "first", [0, 1, 2, 3, 4, 5]),
    (6, 1, "last", [0, 1, 2, 3, 4, 5]),
    (24, 4, "first", [0, 4, 8, 12, 16, 20]),
    (12, 3, [9, 0, 3], [0, 3, 9]),  # a list: sorted
    (12, 3, "11, 0", [0, 11]),  # the command line's comma list
    (12, 11, "first", [0, 11]),
]


@pytest.mark.parametrize("depth, reduction, keep, expected", SELECT_CASES)
def test_select_blocks(depth, reduction, keep, expected):
    assert select_blocks(depth, reduction, keep) == expected


def test_select_blocks_keeps_the_first_by_default():
    assert select_blocks(12, 3) == [0, 3, 6, 9]


REFUSED_CASES = [
    # depth, reduction, keep, words of the message
    (12, 12, "first", "reduction 12 is impossible for a 12-block teacher"),
    (12, 13, "last", "choose 1 <= r < 12"),
    (12, 0, "first", "reduction 0 is impossible"),
    (12, -2, "first", "reduction -2 is impossible"),
    (12, 2.0, "first", "reduction 2.0 is impossible"),
    (12, 2, [0, 12], r"within 0\.\.11"),
    (12, 2, [-1, 3], r"within 0\.\.11"),
    (12, 2, "auto", "plan_student"),
    (12, 2, "greedy", "plan_student"),
    (12, 2, "middle", "--keep 'middle' is invalid"),
    (12, 2, [9, 0, 3, 3], "names block\\(s\\) 3 more than once"),  # would silently train one block fewer
]


@pytest.mark.parametrize("depth, reduction, keep, message", REFUSED_CASES)
def test_select_blocks_refuses(depth, reduction, keep, message):
    with pytest.raises(UserError, match=message):
        select_blocks(depth, reduction, keep)


@pytest.mark.parametrize("depth, reduction, kept", [(12, 2, 6), (12, 3, 4), (12, 5, 3), (12, 11, 2), (7, 2, 4),
                                                    (2, 1, 2)])
def test_check_reduction_counts_the_kept_blocks(depth, reduction, kept):
    assert check_reduction(depth, reduction) == kept == len(select_blocks(depth, reduction, "first"))


@pytest.mark.parametrize("depth, reduction", [(12, 12), (12, 20), (12, 0), (1, 1), (12, None), (12, "2")])
def test_check_reduction_refuses_r_outside_1_to_depth(depth, reduction):
    with pytest.raises(UserError, match="impossible"):
        check_reduction(depth, reduction)


SEGMENT_CASES = [
    # kept, depth, ends_at_kept, segment ends
    ([0, 3, 6, 9], 12, False, [2, 5, 8, 11]),
    ([2, 5, 8, 11], 12, True, [2, 5, 8, 11]),
    ([0, 1, 4, 9], 12, False, [0, 3, 8, 11]),
    ([0, 5, 10], 12, False, [4, 9, 11]),
    ([4, 9], 12, True, [4, 11]),  # the last student block always answers for the teacher's last block
    ([3], 6, False, [5]),
    ([0, 1, 2, 3, 4, 5], 6, False, [0, 1, 2, 3, 4, 5]),
    ([1, 2], 6, False, [1, 5]),
]


@pytest.mark.parametrize("kept, depth, ends_at_kept, expected", SEGMENT_CASES)
def test_segment_ends(kept, depth, ends_at_kept, expected):
    assert segment_ends(kept, depth, ends_at_kept=ends_at_kept) == expected


def test_segment_ends_leaves_the_kept_list_alone():
    kept = [2, 5]
    segment_ends(kept, 12, ends_at_kept=True)
    assert kept == [2, 5]


def test_the_fixed_rules():
    assert KEEP_RULES == ("first", "last")
