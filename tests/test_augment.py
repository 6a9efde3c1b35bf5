"""Tests for wecolora.data.augment.resized_crops: PIL's antialiased bicubic resampling of each box, batched."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wecolora.data.augment as augment
from wecolora.data.augment import resample_weights, resized_crops

BOXES = torch.tensor([[0, 0, 60, 80], [10, 20, 30, 41], [3, 5, 57, 9], [25, 31, 35, 49], [0, 0, 7, 7]], dtype=torch.float)
FLIPS = torch.tensor([False, True, False, True, True])


@pytest.fixture(params=["batched", "per-box"])
def path(request, monkeypatch):
    """Both ways resized_crops runs on the CPU: two batched products over the canvas, or each box alone."""
    monkeypatch.setattr(augment, "DENSE_PIXELS", 10 ** 9 if request.param == "batched" else 0)
    return request.param


def test_a_full_image_box_returns_the_image_and_a_flip_mirrors_it(path):
    images = torch.rand(2, 1, 28, 28)
    full = torch.tensor([[0.0, 0.0, 28.0, 28.0]] * 2)
    torch.testing.assert_close(resized_crops(images, full, 28), images, atol=1e-5, rtol=0)
    flipped = resized_crops(images, full, 28, flip=torch.tensor([True, False]))
    torch.testing.assert_close(flipped[0], images[0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[1], images[1], atol=1e-5, rtol=0)


def test_a_box_is_cut_from_where_it_says_and_reads_nothing_outside_it(path):
    images = torch.rand(1, 3, 28, 28)
    box = torch.tensor([[7.0, 14.0, 14.0, 10.0]])  # top 7, left 14, 14 high, 10 wide
    torch.testing.assert_close(resized_crops(images, box, (14, 10)), images[:, :, 7:21, 14:24], atol=1e-5, rtol=0)
    around = images.clone()
    around[:, :, :7], around[:, :, 21:], around[:, :, :, :14], around[:, :, :, 24:] = 0, 1, 0, 1
    for size in ((28, 20), (5, 4)):  # enlarged, shrunk: the taps stop at the box, as PIL's crop-then-resize
        torch.testing.assert_close(resized_crops(around, box, size), resized_crops(images, box, size), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [16, 64, 224])
def test_integer_boxes_are_torchs_antialiased_bicubic_resize_of_the_crop(path, size):
    images = torch.rand(len(BOXES), 3, 60, 80) * 255
    views = resized_crops(images.to(torch.uint8), BOXES, size, flip=FLIPS)
    for b, (top, left, height, width) in enumerate(BOXES.long().tolist()):
        crop = images.to(torch.uint8)[b:b + 1, :, top:top + height, left:left + width].float()
        expected = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        expected = expected.flip(-1) if FLIPS[b] else expected
        torch.testing.assert_close(views[b], expected, atol=0.02, rtol=0)  # of 255


def test_fractional_boxes_agree_between_the_two_paths_and_with_the_integer_box_they_round_to(monkeypatch):
    images = torch.rand(len(BOXES), 3, 60, 80) * 255
    shifted = BOXES + torch.tensor([0.25, 0.5, -0.5, -0.75])
    shifted[4] = BOXES[4] + torch.tensor([1e-4, 0, 0, 0])  # a hair off an integer box
    views = {}
    for name, dense in (("batched", 10 ** 9), ("per-box", 0)):
        monkeypatch.setattr(augment, "DENSE_PIXELS", dense)
        views[name] = resized_crops(images, shifted, 32, flip=FLIPS)
    torch.testing.assert_close(views["batched"], views["per-box"], atol=0.02, rtol=0)
    torch.testing.assert_close(views["batched"][4], resized_crops(images[4:], BOXES[4:], 32, flip=FLIPS[4:])[0],
                               atol=0.05, rtol=0)


def test_shrinking_averages_every_source_pixel_a_checkerboard_turns_grey(path):
    board = (torch.arange(64)[:, None] + torch.arange(64)[None]) % 2 * 255.0  # 1-pixel checkerboard
    view = resized_crops(board[None, None], torch.tensor([[0.0, 0.0, 64.0, 64.0]]), 16)
    assert (view - 127.5).abs().max() < 1  # antialiased; 4 x 4 taps of a sampler would alias to stripes


def test_resampling_weights_are_normalised_and_local():
    weights = resample_weights(torch.tensor([10.0, 0.0]), torch.tensor([100.0, 7.0]), 120, 25,
                               reverse=torch.tensor([False, True]))
    assert weights.shape == (2, 25, 120)
    torch.testing.assert_close(weights.sum(dim=2), torch.ones(2, 25))
    taps = weights[0].nonzero()[:, 1]
    assert taps.min() >= 10 and taps.max() < 110  # inside the span only
    assert (weights[0] != 0).sum(dim=1).max() <= 4 * 4 + 1  # 4 source pixels per output: 16 taps at most
    np.testing.assert_array_equal(weights[1].flip(0).numpy(), resample_weights(torch.tensor([0.0]), torch.tensor([7.0]), 120, 25)[0].numpy())
