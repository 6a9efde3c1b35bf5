"""Tests for wecolora.method.losses: which blocks the loss matches, the loss values it returns, and the two losses
of a narrower student."""
import pytest
import torch

from wecolora.method.losses import LOSSES, MATCHES, WidthProjector, feature_loss, matched_blocks

# (match, segment ends of the student's blocks, expected (student blocks, teacher blocks, norm))
MATCHED_CASES = [
    ("last", [2, 5, 8, 11], ([3], [11], False)),
    ("last-norm", [2, 5, 8, 11], ([3], [11], True)),
    ("per-block", [2, 5, 8, 11], ([0, 1, 2, 3], [2, 5, 8, 11], False)),
    ("per-block", [0, 3, 8, 11], ([0, 1, 2, 3], [0, 3, 8, 11], False)),  # an explicit keep list's segments
    ("last", [0, 3, 8, 11], ([3], [11], False)),
    ("per-block", [5], ([0], [5], False)),  # a one-block student
    ("last-norm", [1, 3, 5], ([2], [5], True)),
]


@pytest.mark.parametrize("match, ends, expected", MATCHED_CASES, ids=[f"{c[0]}-{c[1]}" for c in MATCHED_CASES])
def test_matched_blocks(match, ends, expected):
    assert matched_blocks(match, ends) == expected


def test_matched_blocks_copies_the_segment_list():
    ends = [1, 3, 5]
    _, teacher_blocks, _ = matched_blocks("per-block", ends)
    teacher_blocks.append(99)
    assert ends == [1, 3, 5]


def test_every_match_has_a_case():
    assert {case[0] for case in MATCHED_CASES} == set(MATCHES)


def _tokens(*values):
    """[1, 2, 1] token tensors holding the given pairs of values."""
    return [torch.tensor(v, dtype=torch.float32).reshape(1, 2, 1) for v in values]


# (kind, student tokens, teacher tokens, expected loss, expected per-block terms or None)
LOSS_CASES = [
    ("l1", _tokens([1.0, 3.0]), _tokens([0.0, 0.0]), 2.0, None),
    ("mse", _tokens([1.0, 3.0]), _tokens([0.0, 0.0]), 5.0, None),
    ("l1", _tokens([1.0, 1.0], [0.0, 4.0]), _tokens([0.0, 0.0], [0.0, 0.0]), 1.5, [1.0, 2.0]),
    ("mse", _tokens([2.0, 0.0], [1.0, 1.0]), _tokens([0.0, 0.0], [0.0, 0.0]), 1.5, [2.0, 1.0]),
    ("l1", _tokens([1.0, 2.0]), _tokens([1.0, 2.0]), 0.0, None),
]


@pytest.mark.parametrize("kind, student, teacher, loss, terms", LOSS_CASES)
def test_feature_loss_values(kind, student, teacher, loss, terms):
    out = feature_loss(student, teacher, kind)
    assert out["loss"].item() == pytest.approx(loss)
    assert out[kind].item() == pytest.approx(loss)
    if terms is None:
        assert set(out) == {"loss", kind}
    else:
        assert set(out) == {"loss", kind, *(f"{kind}_block{i}" for i in range(len(terms)))}
        assert [out[f"{kind}_block{i}"].item() for i in range(len(terms))] == pytest.approx(terms)


def test_feature_loss_default_is_l1_and_every_kind_is_a_registered_loss():
    out = feature_loss(_tokens([1.0, -3.0]), _tokens([0.0, 0.0]))
    assert set(out) == {"loss", "l1"} and out["loss"].item() == pytest.approx(2.0)
    assert set(LOSSES) == {"l1", "mse"}


def test_only_the_loss_carries_gradients_and_they_reach_the_student():
    student = [torch.tensor([[[1.0], [3.0]]], requires_grad=True) for _ in range(2)]
    out = feature_loss(student, _tokens([0.0, 0.0], [0.0, 0.0]), "l1")
    assert out["loss"].requires_grad
    assert not out["l1"].requires_grad and not out["l1_block0"].requires_grad
    out["loss"].backward()
    # mean over 2 blocks of the mean over 2 tokens: each element's gradient is sign / 4
    assert student[0].grad.flatten().tolist() == pytest.approx([0.25, 0.25])


def test_feature_loss_computes_in_fp32():
    """bf16 tokens (autocast) give an fp32 loss, not a bf16 one."""
    student = [torch.full((1, 4, 8), 1.0 + 2 ** -7, dtype=torch.bfloat16)]
    teacher = [torch.ones(1, 4, 8, dtype=torch.bfloat16)]
    out = feature_loss(student, teacher, "mse")
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(2 ** -14)


def test_feature_loss_refuses_unequal_block_counts():
    with pytest.raises(ValueError):
        feature_loss(_tokens([0.0, 0.0], [1.0, 1.0]), _tokens([0.0, 0.0]))


def test_feature_loss_refuses_an_unknown_kind():
    with pytest.raises(KeyError):
        feature_loss(_tokens([0.0, 0.0]), _tokens([0.0, 0.0]), "huber")


def test_kept_channels_compare_the_teacher_on_those_channels_only():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 8, generator=gen)
    channels = torch.tensor([1, 4, 6])
    student = teacher[..., [1, 4, 6]] + 0.5
    out = feature_loss([student], [teacher], "l1", channels=channels)
    assert torch.isclose(out["loss"], torch.tensor(0.5))
    assert torch.isclose(feature_loss([teacher[..., [1, 4, 6]]], [teacher], channels=channels)["loss"], torch.tensor(0.0))


def test_the_projection_starts_as_the_kept_channels_and_trains():
    channels = [1, 4, 6]
    projector = WidthProjector(channels, 8, blocks=2)
    tokens = [torch.randn(2, 5, 3), torch.randn(2, 5, 3)]
    for got, t in zip(projector(tokens), tokens):
        assert got.shape == (2, 5, 8)
        torch.testing.assert_close(got[..., channels], t)
        assert not got[..., [0, 2, 3, 5, 7]].any()
    teacher = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    loss = feature_loss(projector(tokens), teacher)["loss"]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
