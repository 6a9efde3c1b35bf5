"""Tests for wecolora.cache.images: the decoded store, the seeded view parameters, and views cut on the device."""
import json
import logging
import multiprocessing

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

import wecolora.cache.images as image_store
import wecolora.data.views as view_module
from wecolora.cache.admin import CacheCap, evict, list_entries, locked, mark_in_use, release_in_use
from wecolora.data.datasets import ImageFolderSplit, load_rgb, open_dataset
from wecolora.data.views import view_seed
from wecolora.errors import UserError

from conftest import tiny_vit

SIZES = [(28, 28), (258, 344), (344, 258), (10, 200), (200, 10), (33, 31)]  # the last four hit the fallback too


@pytest.fixture(scope="module")
def fashion():
    try:
        return open_dataset("fashion-mnist", "train")
    except UserError as err:
        pytest.skip(str(err))


def smooth_rgb(height: int, width: int, seed: int) -> Image.Image:
    """A textured photo-like image: coarse random colours upsampled smoothly, with one sharp-edged block."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 10, width // 10, 3), dtype=np.uint8))
    pixels = np.array(coarse.resize((width, height), Image.BICUBIC))
    pixels[height // 4: height // 2, width // 3: width // 2] = (250, 20, 40)
    return Image.fromarray(pixels)


def image_folder(root, files: dict) -> ImageFolderSplit:
    """A one-class image folder holding ``files`` (name -> PIL image, saved by its extension)."""
    (root / "a").mkdir(parents=True)
    for name, image in files.items():
        image.save(root / "a" / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    return open_dataset(str(root))


# ---------------------------------------------------------------------------------------------
# View parameters


class SeededTorch:
    """``torch`` as torchvision's ``get_params`` sees it, its draws taken from view_params' documented layout."""

    def __init__(self, u: np.ndarray):
        self.u, self.uniforms, self.integers = u, 0, 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *size):
        return self

    def uniform_(self, low, high):  # attempt k draws its area fraction u[k], then its log aspect u[10 + k]
        k, self.uniforms = self.uniforms, self.uniforms + 1
        u = self.u[k // 2] if k % 2 == 0 else self.u[10 + k // 2]
        return torch.tensor([float(low) + (float(high) - float(low)) * u], dtype=torch.float64)

    def randint(self, low, high, size):  # top from u[20], left from u[21]
        u, self.integers = self.u[20 + self.integers], self.integers + 1
        return torch.tensor([low + int(u * (high - low))])


def test_view_params_are_torchvisions_get_params_on_the_seeded_draws(monkeypatch):
    indices = np.arange(0, 600, 7)
    sizes = np.array([SIZES[i % len(SIZES)] for i in range(len(indices))])
    boxes, flips = view_module.view_params(3, 2, indices, sizes)
    fallbacks = 0
    for index, (height, width), box, flip in zip(indices, sizes, boxes.tolist(), flips.tolist()):
        u = np.random.default_rng(view_seed(3, 2, int(index))).random(23)
        fake = SeededTorch(u)
        monkeypatch.setattr(T.transforms, "torch", fake)
        expected = T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.2, 1.0], [3 / 4, 4 / 3])
        monkeypatch.undo()
        assert tuple(int(v) for v in box) == expected, (index, height, width)
        assert flip == (u[22] < 0.5)
        fallbacks += fake.integers == 0
    assert 0 < fallbacks < len(indices)  # both branches of get_params were compared
    assert 0.3 < flips.float().mean() < 0.7


def test_a_view_ignores_the_batch_its_order_and_the_process():
    indices, sizes = np.array([5, 900, 17, 3]), np.array([[28, 28], [258, 344], [40, 30], [28, 28]])
    boxes, flips = view_module.view_params(0, 1, indices, sizes)
    order = [2, 0, 3]
    part_boxes, part_flips = view_module.view_params(0, 1, indices[order], sizes[order])
    assert torch.equal(part_boxes, boxes[order]) and torch.equal(part_flips, flips[order])
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a new interpreter, as another process of a run
        other_boxes, other_flips = pool.apply(view_module.view_params, (0, 1, indices, sizes))
    assert torch.equal(other_boxes, boxes) and torch.equal(other_flips, flips)
    next_view, _ = view_module.view_params(0, 2, indices, sizes)
    other_seed, _ = view_module.view_params(1, 1, indices, sizes)
    assert not torch.equal(next_view, boxes) and not torch.equal(other_seed, boxes)


# ---------------------------------------------------------------------------------------------
# Device views against the PIL path


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images on the 0-255 scale."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def pil_view(image: Image.Image, box, flip: bool, size=(224, 224)) -> torch.Tensor:
    """torchvision's PIL pipeline for one box and flip: resized_crop (bicubic, antialiased), then the flip."""
    top, left, height, width = (int(v) for v in box)
    view = TF.resized_crop(image, top, left, height, width, list(size), InterpolationMode.BICUBIC, antialias=True)
    return _pil_to_tensor(TF.hflip(view) if flip else view)


def test_device_views_of_fashion_mnist_match_torchvisions_pil_crop(fashion, tmp_path):
    indices = list(range(0, 6400, 100))
    recipe = view_module.ViewRecipe((224, 224), (0.0,) * 3, (1.0,) * 3, bound=579)  # identity normalisation
    store = image_store.open_store(fashion, indices, bound=recipe.bound, cache_dir=tmp_path)
    assert store.canvas == (28, 28) and store.originals.tolist() == [[28, 28]] * len(indices)  # never enlarged
    batch = image_store.StoreBatches(store, indices, recipe, seed=0, view=0)[list(range(len(indices)))]
    boxes, flips = recipe.params(0, 0, np.array(indices), store.originals)
    assert torch.equal(batch["boxes"], boxes)  # stored whole: the boxes on the originals
    views = recipe.pixels(batch["pixels"], batch["boxes"], batch["flips"]) * 255
    misplaced = recipe.pixels(batch["pixels"], boxes + torch.tensor([0.0, 1.0, 0.0, 0.0]), flips) * 255
    scores = [psnr(views[p], pil_view(fashion[index][0], boxes[p], flips[p])) for p, index in enumerate(indices)]
    off = [psnr(misplaced[p], pil_view(fashion[index][0], boxes[p], flips[p])) for p, index in enumerate(indices)]
    # PIL's resampling, but in float: only PIL's rounding to 8 bits between its two passes differs (measured
    # 49-64 dB); a box one pixel off gives 10-28 dB.
    assert min(scores) > 45 and max(off) < 35


def test_device_views_of_an_image_stored_shrunk_match_pil_on_the_original(tmp_path):
    dataset = image_folder(tmp_path / "data", {f"{k}.jpg": smooth_rgb(900, 1200, k) for k in range(3)})
    recipe = view_module.ViewRecipe((224, 224), (0.0,) * 3, (1.0,) * 3, bound=view_module.short_side_bound(224))
    store = image_store.open_store(dataset, range(3), bound=recipe.bound, cache_dir=tmp_path / "stores")
    assert store.sizes.tolist() == [[579, 772]] * 3 and store.originals.tolist() == [[900, 1200]] * 3
    for view in range(4):
        batch = image_store.StoreBatches(store, range(3), recipe, seed=0, view=view)[[0, 1, 2]]
        boxes, flips = recipe.params(0, view, np.arange(3), store.originals)
        torch.testing.assert_close(batch["boxes"], boxes * torch.tensor([579 / 900, 772 / 1200] * 2))
        views = recipe.pixels(batch["pixels"], batch["boxes"], batch["flips"]) * 255
        for p in range(3):
            expected = pil_view(load_rgb(dataset.samples[p][0]), boxes[p], flips[p])
            # Shrunk once into the store (antialiased), then resampled from at least 224 stored pixels a side:
            # measured 53-57 dB on these smooth images (46-56 dB on photos, docs/speed.md).
            assert psnr(views[p], expected) > 40, (view, p, boxes[p])


def test_the_recipe_follows_the_model_and_normalises_with_its_mean_and_std():
    model = tiny_vit(depth=1, img_size=28, patch_size=7)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.2, 0.3, 0.4), "std": (0.5, 0.5, 0.25)}
    recipe = view_module.ViewRecipe.for_model(model)
    assert (recipe.size, recipe.bound, recipe.mean) == ((28, 28), 73, (0.2, 0.3, 0.4))
    flat = torch.full((2, 3, 28, 28), 102, dtype=torch.uint8)
    views = recipe.apply(flat, torch.tensor([[0.0, 0.0, 28.0, 28.0], [3.0, 4.0, 10.0, 12.0]]), torch.tensor([True, False]))
    expected = (torch.tensor([0.4, 0.4, 0.4]) - torch.tensor(recipe.mean)) / torch.tensor(recipe.std)
    torch.testing.assert_close(views.mean(dim=(2, 3)), expected.expand(2, 3), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# The store


class Counting:
    """Counts calls to the store's two decoders."""

    def __init__(self, monkeypatch):
        import torchvision.io

        self.calls = {"decode_jpeg": 0, "decode_with_pil": 0}
        for module, name in ((torchvision.io, "decode_jpeg"), (image_store, "decode_with_pil")):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, self._counted(name, real))

    def _counted(self, name, real):
        def call(*args, **kwargs):
            self.calls[name] += 1
            return real(*args, **kwargs)
        return call


def test_jpegs_decode_with_torchvision_and_the_rest_with_pil_to_pils_pixels(tmp_path, monkeypatch):
    grey = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8))
    files = {"photo.jpg": smooth_rgb(40, 50, 0), "lossless.png": smooth_rgb(30, 40, 1), "grey.jpg": grey}
    dataset = image_folder(tmp_path / "data", files)
    counting = Counting(monkeypatch)
    store = image_store.open_store(dataset, range(3), bound=100, cache_dir=tmp_path / "stores")
    assert counting.calls == {"decode_jpeg": 1, "decode_with_pil": 2}  # grey JPEGs and PNGs go through PIL
    assert store.canvas == (40, 50) and store.pixels.dtype == np.uint8
    for p, (path, _) in enumerate(dataset.samples):
        expected = np.array(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(store.image(p), expected), path  # libjpeg-turbo decodes alike in both


def test_the_bound_shrinks_large_images_antialiased_and_a_second_open_decodes_nothing(tmp_path, monkeypatch):
    files = {"wide.jpg": smooth_rgb(300, 400, 0), "tall.png": smooth_rgb(500, 200, 1), "small.png": smooth_rgb(50, 60, 2)}
    dataset = image_folder(tmp_path / "data", files)
    counting = Counting(monkeypatch)
    store = image_store.open_store(dataset, range(3), bound=100, cache_dir=tmp_path / "stores")
    by_name = dict(zip((p.rsplit("/", 1)[1] for p, _ in dataset.samples), store.sizes.tolist()))
    # Short side at most 100; the 2.5:1 image also meets the long-side limit (200); never enlarged.
    assert by_name == {"wide.jpg": [100, 133], "tall.png": [200, 80], "small.png": [50, 60]}
    assert store.canvas == (200, 133)
    wide = [p for p, (path, _) in enumerate(dataset.samples) if path.endswith("wide.jpg")][0]
    expected = np.array(load_rgb(dataset.samples[wide][0]).resize((133, 100), Image.BICUBIC)).transpose(2, 0, 1)
    assert np.abs(store.image(wide).astype(int) - expected).mean() < 1  # PIL's antialiased shrink
    meta = json.loads((store.folder / "meta.json").read_text())
    assert meta["bytes"] == 3 * (100 * 133 + 200 * 80 + 50 * 60) and store.record()["canvas"] == [200, 133]

    calls = dict(counting.calls)
    again = image_store.open_store(dataset, range(3), bound=100, cache_dir=tmp_path / "stores")
    assert counting.calls == calls and again.folder == store.folder  # reused, not decoded again
    other = image_store.open_store(dataset, range(3), bound=120, cache_dir=tmp_path / "stores")
    assert other.folder != store.folder and counting.calls != calls  # another bound is another store
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == sorted([store.folder.name, other.folder.name])


def test_a_mixed_orientation_subset_is_stored_at_its_sizes_and_read_on_the_format_1_canvas(tmp_path):
    shapes = [(30, 40), (40, 30), (30, 40), (12, 50), (40, 30)]  # landscape, portrait and one wide image
    dataset = image_folder(tmp_path / "data", {f"{k}.png": smooth_rgb(h, w, k) for k, (h, w) in enumerate(shapes)})
    store = image_store.open_store(dataset, range(len(shapes)), bound=100, cache_dir=tmp_path / "stores")
    n, (height, width) = len(shapes), store.canvas
    assert store.canvas == (40, 50)
    real = sum(3 * h * w for h, w in shapes)
    on_disk = np.load(store.folder / "pixels.npy", mmap_mode="r")
    assert on_disk.nbytes == real == store.meta["bytes"] < n * 3 * height * width
    # Format 1's rows: each image at the top left of the canvas, the rest repeating its last row and column.
    images = [np.array(load_rgb(path)).transpose(2, 0, 1) for path, _ in dataset.samples]
    expected = np.stack([np.pad(im, ((0, 0), (0, height - im.shape[1]), (0, width - im.shape[2])), mode="edge")
                         for im in images])
    order = [3, 0, 4, 1, 1]
    assert np.array_equal(store.rows(order), expected[order]) and store.rows([2]).shape == (1, 3, 40, 50)


def test_a_format_1_store_is_built_again_in_the_current_format(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="wecolora.cache.images")
    digits = open_dataset("mnist-5k", "train")
    store = image_store.open_store(digits, [1, 2], bound=33, cache_dir=tmp_path)
    folder = store.folder
    del store
    (folder / "offsets.npy").unlink()  # as a format-1 store: one [n, 3, Hc, Wc] array, no offsets
    np.save(folder / "pixels.npy", np.zeros((2, 3, 28, 28), dtype=np.uint8))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 1, "bytes": 2 * 3 * 28 * 28}))
    again = image_store.open_store(digits, [1, 2], bound=33, cache_dir=tmp_path)
    assert "format 1 of an older wecolora" in caplog.text and again.folder == folder
    assert again.meta["format"] == image_store.STORE_FORMAT
    assert np.array_equal(again.image(1)[0], digits.images[2])


def test_in_memory_images_are_stored_as_they_are(tmp_path):
    digits = open_dataset("mnist-5k", "train")
    indices = [3, 50, 700]
    store = image_store.open_store(digits, indices, bound=33, num_workers=0, cache_dir=tmp_path)
    assert store.pixels.shape == (3 * 3 * 28 * 28,) and store.sizes.tolist() == [[28, 28]] * 3
    for p, index in enumerate(indices):
        assert np.array_equal(store.image(p), np.repeat(digits.images[index][None], 3, axis=0))


def test_a_damaged_image_stops_the_build_with_the_loaders_error_and_leaves_nothing(tmp_path):
    dataset = image_folder(tmp_path / "data", {"good.jpg": smooth_rgb(40, 50, 0), "bad.jpg": smooth_rgb(40, 50, 1)})
    bad = next(path for path, _ in dataset.samples if path.endswith("bad.jpg"))
    with open(bad, "r+b") as f:  # the header reads; the pixels are cut short
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(UserError, match=r"image .*bad.jpg cannot be read any more") as err:
        image_store.open_store(dataset, range(2), bound=100, cache_dir=tmp_path / "stores", num_workers=1)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "stores").iterdir())  # no store, no half-written temporary folder
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(UserError, match=r"bad.jpg cannot be read any more"):
        image_store.open_store(dataset, range(2), bound=100, cache_dir=tmp_path / "stores")


def test_half_built_stores_of_dead_builders_are_removed(tmp_path):
    import os
    import socket
    import subprocess

    child = subprocess.Popen(["true"])  # its pid is free once it has exited
    child.wait()
    host = socket.gethostname()
    dead = tmp_path / f".abc-33px.{host}-{child.pid}.x_1.tmp"
    alive = tmp_path / f".abc-33px.{host}-{os.getppid()}.x_2.tmp"
    elsewhere = tmp_path / f".abc-33px.other.host-{child.pid}.x_3.tmp"
    for folder in (dead, alive, elsewhere):
        folder.mkdir()
    image_store.open_store(open_dataset("mnist-5k", "train"), [0, 1], bound=33, cache_dir=tmp_path)
    assert not dead.exists() and alive.exists() and elsewhere.exists()


def test_store_batches_carry_the_rows_and_their_view():
    digits = open_dataset("mnist-5k", "train")
    indices = [3, 50, 700, 9]
    store = image_store.open_store(digits, indices, bound=33)
    recipe = view_module.ViewRecipe((28, 28), (0.5,) * 3, (0.5,) * 3, bound=33)
    batches = image_store.StoreBatches(store, indices, recipe, seed=4, view=1)
    batch = batches[[[2, 0]]]  # accelerate nests the sampler's list once more
    assert batch["positions"].tolist() == [2, 0] and batch["pixels"].shape == (2, 3, 28, 28)
    boxes, flips = view_module.view_params(4, 1, [700, 3], [[28, 28]] * 2)
    assert torch.equal(batch["boxes"], boxes) and torch.equal(batch["flips"], flips) and "tokens" not in batch
    generator = torch.Generator().manual_seed(0)
    order = [b["positions"].tolist() for b in image_store.store_loader(batches, 3, generator)]
    generator.manual_seed(0)
    per_image = torch.utils.data.DataLoader(range(4), batch_size=3, generator=generator,
                                            sampler=torch.utils.data.RandomSampler(range(4), generator=generator))
    assert order == [b.tolist() for b in per_image]  # the batches the per-image loader gives


def test_a_store_damaged_after_it_was_built_is_built_again(tmp_path, caplog):
    digits = open_dataset("mnist-5k", "train")
    store = image_store.open_store(digits, [1, 2, 3], bound=33, cache_dir=tmp_path)
    pixels = store.folder / "pixels.npy"
    pixels.write_bytes(pixels.read_bytes()[:-100])  # truncated behind our back
    again = image_store.open_store(digits, [1, 2, 3], bound=33, cache_dir=tmp_path)
    assert "is damaged" in caplog.text and again.folder == store.folder
    assert np.array_equal(again.image(1)[0], digits.images[2])


def test_a_full_disk_or_unwritable_folder_is_one_line_naming_the_size_and_the_fix(tmp_path, monkeypatch):
    import errno
    import os

    digits = open_dataset("mnist-5k", "train")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UserError, match=r"image store of this subset \(0.00 GB\) .*No space left.*WECOLORA_CACHE_DIR"):
        image_store.open_store(digits, [1, 2], bound=33, cache_dir=tmp_path / "stores")
    assert not list((tmp_path / "stores").iterdir())  # the temporary folder is gone too
    monkeypatch.undo()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="cannot write the image store"):
        image_store.open_store(digits, [1, 2], bound=33, cache_dir=tmp_path / "a-file" / "stores")


def test_a_store_in_use_is_not_cleared_by_wecolora_cache(tmp_path):
    import gc


    store = image_store.open_store(open_dataset("mnist-5k", "train"), [1, 2], bound=33, cache_dir=tmp_path)
    folder = store.folder
    assert locked(folder) and not evict(folder) and folder.is_dir()
    del store
    gc.collect()
    assert not locked(folder) and evict(folder) and not folder.exists()


def test_a_new_store_evicts_the_least_recently_used_entry_not_in_use_or_is_built_over_the_cap(tmp_path, monkeypatch,
                                                                                              caplog):
    from test_cache_admin import fake_teacher_entry


    monkeypatch.setenv("WECOLORA_CACHE_DIR", str(tmp_path))
    digits = open_dataset("mnist-5k", "train")
    in_use = fake_teacher_entry(tmp_path, "in-use", views=1, days_ago=5)
    old = fake_teacher_entry(tmp_path, "old", views=1, days_ago=3)
    recent = fake_teacher_entry(tmp_path, "recent", views=1, days_ago=1)
    store_bytes = 2 * 3 * 28 * 28  # two [3, 28, 28] uint8 images
    cap_gb = (sum(e.bytes for e in list_entries(tmp_path)) + store_bytes - 10) / 1e9  # one must go
    mark_in_use(in_use)  # this process trains with it
    try:
        store = image_store.open_store(digits, [1, 2], bound=33, cap=CacheCap.resolve(cap_gb))
        assert store.meta["bytes"] == store_bytes and store.folder.parent == tmp_path / "images"
        assert not old.exists() and in_use.is_dir() and recent.is_dir() and "over its" not in caplog.text

        # Over the cap by itself: built anyway, nothing evicted, one warning naming the fix.
        big = image_store.open_store(digits, [1, 2, 3], bound=33, cap=CacheCap.resolve(store_bytes / 1e9))
        assert len(big) == 3 and store.folder.is_dir() and recent.is_dir()
        assert "over its" in caplog.text and "--cache-max-gb or $WECOLORA_CACHE_MAX_GB" in caplog.text
    finally:
        release_in_use()
