"""Tests for wecolora.method.losses: the matched blocks, and the two losses of a narrower student."""
import torch

from wecolora.method.losses import WidthProjector, feature_loss, matched_blocks


def test_matched_blocks():
    assert matched_blocks("per-block", [2, 5, 8, 11]) == ([0, 1, 2, 3], [2, 5, 8, 11], False)
    assert matched_blocks("last-norm", [0, 3, 8, 11]) == ([3], [11], True)


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
