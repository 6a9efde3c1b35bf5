"""Tests for wecolora.data.views: the seeded augmented views of stored images (seeds, crop boxes and flips,
the recipe at a model's input size, and the stored short side)."""
import dataclasses
import math

import pytest
import torch

from wecolora.data import augment
from wecolora.data.views import ViewRecipe, short_side_bound, view_params, view_seed

from conftest import tiny_vit


def test_view_seed_is_a_stable_63_bit_function_of_its_keys():
    seeds = {view_seed(s, v, i) for s in range(3) for v in range(3) for i in range(20)}
    assert len(seeds) == 3 * 3 * 20  # no two (seed, view, image) share a seed
    assert all(0 <= s < 2 ** 63 for s in seeds)
    assert view_seed(0, 1, 2) == view_seed(0, 1, 2)
    assert view_seed(0, 1, 2) != view_seed(0, 2, 1) != view_seed(1, 0, 2)


@pytest.mark.parametrize("size, bound", [(224, 579), ((224, 224), 579), ((28, 28), 73), ((32, 48), 124)])
def test_short_side_bound_leaves_the_smallest_box_its_input_size(size, bound):
    """The narrowest box of the recipe (area 0.2, aspect 3/4) spans sqrt(0.2 x 3/4) of the short side."""
    side = max(size) if isinstance(size, tuple) else size
    assert short_side_bound(size) == bound == math.ceil(side / math.sqrt(0.2 * 0.75) - 1e-9)


SIZES = [[28, 28], [258, 344], [40, 30], [19, 19]]


def test_boxes_lie_inside_their_images_and_are_whole_pixels():
    boxes, flips = view_params(0, 1, range(len(SIZES)), SIZES)
    assert boxes.shape == (4, 4) and boxes.dtype == torch.float32 and flips.shape == (4,) and flips.dtype == torch.bool
    top, left, h, w = boxes.unbind(1)
    size = torch.tensor(SIZES, dtype=torch.float32)
    assert bool((boxes == boxes.round()).all())
    assert bool(((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1)).all())
    assert bool(((top + h <= size[:, 0]) & (left + w <= size[:, 1])).all())


def test_box_areas_and_aspects_follow_the_recipe():
    n = 400
    boxes, _ = view_params(7, 0, range(n), [[200, 200]] * n)
    area = boxes[:, 2] * boxes[:, 3] / (200 * 200)
    aspect = boxes[:, 3] / boxes[:, 2]
    # rounding to whole pixels moves the area and the aspect a little past the drawn ranges
    assert float(area.min()) >= 0.19 and float(area.max()) <= 1.0
    assert float(aspect.min()) >= 0.74 and float(aspect.max()) <= 1.35
    assert float(area.min()) < 0.25 and float(area.max()) > 0.9  # the whole range is drawn from


@pytest.mark.parametrize("hflip, flipped", [(0.0, 0), (1.0, 50)])
def test_the_flip_probability(hflip, flipped):
    _, flips = view_params(0, 0, range(50), [[28, 28]] * 50, hflip=hflip)
    assert int(flips.sum()) == flipped


def test_about_half_the_views_are_flipped():
    _, flips = view_params(0, 0, range(1000), [[28, 28]] * 1000)
    assert 430 <= int(flips.sum()) <= 570


def test_a_view_depends_on_the_image_index_not_on_its_batch():
    boxes, flips = view_params(3, 2, [5, 9, 11], [[28, 28], [30, 40], [50, 20]])
    alone, alone_flip = view_params(3, 2, [9], [[30, 40]])
    assert torch.equal(boxes[1:2], alone) and torch.equal(flips[1:2], alone_flip)


def test_a_full_scale_range_gives_the_whole_image():
    boxes, _ = view_params(0, 0, range(5), [[28, 28]] * 5, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert boxes.tolist() == [[0.0, 0.0, 28.0, 28.0]] * 5


def test_the_recipe_of_a_model():
    recipe = ViewRecipe.for_model(tiny_vit(img_size=28, patch_size=7))
    assert recipe.size == (28, 28) and recipe.bound == 73
    assert (recipe.scale, recipe.ratio, recipe.hflip) == (augment.SCALE, augment.RATIO, 0.5)
    assert len(recipe.mean) == len(recipe.std) == 3
    assert "bound=73" in repr(recipe)  # the repr names the views in the teacher cache's key
    assert repr(dataclasses.replace(recipe, hflip=0.2)) != repr(recipe)


def test_the_recipe_s_params_use_its_own_ranges():
    recipe = ViewRecipe((28, 28), (0.5,) * 3, (0.5,) * 3, bound=33, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    boxes, flips = recipe.params(0, 0, [0, 1], [[28, 28], [28, 28]])
    assert boxes.tolist() == [[0.0, 0.0, 28.0, 28.0]] * 2 and not bool(flips.any())


def test_apply_crops_resizes_and_normalises():
    recipe = ViewRecipe((8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), bound=10)
    pixels = torch.full((2, 3, 20, 20), 255, dtype=torch.uint8)  # white
    pixels[1] = 0  # black
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 10.0, 10.0]])
    out = recipe.apply(pixels, boxes, torch.tensor([False, True]))
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.full((3, 8, 8), (1.0 - 0.5) / 0.25))
    torch.testing.assert_close(out[1], torch.full((3, 8, 8), (0.0 - 0.5) / 0.25))


def test_apply_flips_left_to_right():
    recipe = ViewRecipe((4, 4), (0.0,) * 3, (1.0,) * 3, bound=5)
    pixels = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    pixels[..., :2] = 255  # the left half white
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    plain = recipe.apply(pixels.clone(), box, torch.tensor([False]))
    flipped = recipe.apply(pixels.clone(), box, torch.tensor([True]))
    torch.testing.assert_close(flipped, plain.flip(-1))
    assert float(plain[..., :2].mean()) > 0.9 and float(plain[..., 2:].mean()) < 0.1
