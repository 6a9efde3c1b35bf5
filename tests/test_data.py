import os
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from wecolora.data.datasets import open_dataset
from wecolora.data.subset import few_shot_indices, write_subset
from wecolora.data.transforms import eval_transform, train_transform
from wecolora.errors import UserError

from conftest import tiny_vit


def save_png(path, mode="RGB"):
    """A 6x5 image of the given mode: "RGB", "L", "RGBA", "P" or "I;16" (16-bit grey)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full((5, 6), 40000, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, (6, 5), color=200 if mode in ("L", "P") else (200, 100, 50, 128)[: len(mode)]).save(path)


@pytest.fixture
def folder(tmp_path):
    """train/{cat,dog} (one grey, one RGBA, one 16-bit PNG among them) and val/{cat,dog}."""
    root = tmp_path / "ds"
    for name, mode in [("001.png", "RGB"), ("002.png", "L"), ("003.jpg", "RGB")]:
        save_png(root / "train" / "cat" / name, mode)
    for name, mode in [("a.png", "RGBA"), ("b.png", "I;16"), ("c.png", "P")]:
        save_png(root / "train" / "dog" / name, mode)
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    save_png(root / "val" / "cat" / "v1.png")
    save_png(root / "val" / "dog" / "v2.png", "L")
    return root


def test_folder_train_split(folder):
    ds = open_dataset(str(folder))
    assert ds.classes == ["cat", "dog"]
    assert ds.targets == [0, 0, 0, 1, 1, 1]
    assert ds.sample_ids[0] == "train/cat/001.png"
    assert ds.sample_ids[-1] == "train/dog/c.png"
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.mode == "RGB" and img.size == (6, 5) and label == ds.targets[i]
    # 16-bit grey 40000/65535 becomes about 156, not clipped to white.
    assert np.asarray(ds[ds.sample_ids.index("train/dog/b.png")][0])[0, 0].tolist() == [156] * 3


def test_folder_test_split_uses_val_and_train_labels(folder):
    (folder / "train" / "emu").mkdir()
    save_png(folder / "train" / "emu" / "e.png")
    ds = open_dataset(str(folder), "test")  # emu is absent from val/: dog keeps label 2
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.targets == [0, 1]
    assert ds.sample_ids == ["val/cat/v1.png", "val/dog/v2.png"]


def test_folder_of_class_folders_is_train_split(folder):
    ds = open_dataset(str(folder / "train"))
    assert ds.sample_ids[0] == "cat/001.png" and len(ds) == 6


def test_folder_with_transform(folder):
    ds = open_dataset(str(folder), transform=eval_transform(tiny_vit(depth=2)))
    x, _ = ds[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32


def build_folder(tmp_path, case):
    """Build the folder a scenario names and return its path; other strings are specs as they are."""
    root = tmp_path / "d"
    if case == "<file>":
        root.write_text("x")
    elif case == "<no class folders>":  # (a folder of loose images is an unlabeled source: tests/test_sources.py)
        root.mkdir()
    elif case == "<empty class>":
        save_png(root / "train" / "cat" / "1.png")
        (root / "train" / "dog").mkdir()
        (root / "train" / "dog" / "readme.txt").write_text("")
    elif case == "<flat>":
        save_png(root / "cat" / "1.png")
    elif case == "<train only>":
        save_png(root / "train" / "cat" / "1.png")
    elif case == "<unknown test class>":
        save_png(root / "train" / "cat" / "1.png")
        save_png(root / "test" / "cow" / "1.png")
    else:
        return case
    return str(root)


OPEN_ERRORS = [
    # (scenario, spec or <folder to build>, split, fragment of the message)
    ("missing path", "/no/such/folder", "train", "neither an existing folder nor a built-in name"),
    ("unknown built-in lists the valid ones", "cifar-10", "train", "fashion-mnist, mnist-5k"),
    ("bad split", "mnist-5k", "validation", "unknown split 'validation'"),
    ("a file", "<file>", "train", "is a file"),
    ("no class folders", "<no class folders>", "train", "no class folders in"),
    ("class folder with no images", "<empty class>", "train", "['dog']"),
    ("flat folder has no test split", "<flat>", "test", "train split only"),
    ("train/ without val/ or test/", "<train only>", "test", "has no test split"),
    ("test class not in train", "<unknown test class>", "test", "['cow']"),
]


@pytest.mark.parametrize("spec,split,fragment", [c[1:] for c in OPEN_ERRORS], ids=[c[0] for c in OPEN_ERRORS])
def test_open_dataset_errors(tmp_path, spec, split, fragment):
    with pytest.raises(UserError) as err:
        open_dataset(build_folder(tmp_path, spec), split)
    assert fragment in str(err.value)


def test_fashion_mnist():
    train, test = open_dataset("fashion-mnist"), open_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    assert set(Counter(train.targets).values()) == {6000}
    img, label = train[123]
    assert img.mode == "RGB" and img.size == (28, 28) and label == train.targets[123]
    assert train.sample_ids[123] == "train/000123" and test.sample_ids[0] == "test/000000"


def test_fashion_mnist_env_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WECOLORA_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(UserError, match="WECOLORA_FASHION_MNIST_DIR"):
        open_dataset("fashion-mnist")


def test_mnist_5k():
    train, test = open_dataset("mnist-5k"), open_dataset("mnist-5k", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.classes == [str(d) for d in range(10)]
    assert set(Counter(train.targets).values()) == {400}
    assert set(Counter(test.targets).values()) == {100}
    assert test[0][0].mode == "RGB"


TARGETS = [0] * 100 + [1] * 37 + [2] * 10  # literal class sizes


def test_few_shot_counts_are_floor_per_class():
    idx = few_shot_indices(TARGETS, ratio=0.29)
    counts = Counter(TARGETS[i] for i in idx)
    assert counts == {0: 29, 1: 10, 2: 2}  # 100*0.29 is 28.999..., still 29
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert Counter(TARGETS[i] for i in few_shot_indices(TARGETS, ratio=1.0)) == Counter(TARGETS)


def test_few_shot_seeded_and_independent_of_global_rng():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    a = few_shot_indices(TARGETS, ratio=0.2, seed=3)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    assert few_shot_indices(TARGETS, ratio=0.2, seed=3) == a
    assert few_shot_indices(TARGETS, ratio=0.2, seed=4) != a


def test_few_shot_per_class_caps_at_class_size():
    idx = few_shot_indices(TARGETS, per_class=20)
    assert Counter(TARGETS[i] for i in idx) == {0: 20, 1: 20, 2: 10}


FEW_SHOT_ERRORS = [
    ("zero images in a class names it", dict(ratio=0.05), "class 2 (10 images -> 0)"),
    ("and suggests a ratio", dict(ratio=0.05), "ratio of at least 0.1"),
    ("min_per_class", dict(ratio=0.2, min_per_class=3), "class 2 (10 images -> 2)"),
    ("per_class below min", dict(per_class=5, min_per_class=11), "--min-per-class"),
    ("neither ratio nor per_class", dict(), "exactly one"),
    ("both ratio and per_class", dict(ratio=0.1, per_class=1), "exactly one"),
    ("ratio zero", dict(ratio=0.0), "ratio 0.0 is outside (0, 1]"),
    ("ratio above one", dict(ratio=1.5), "outside (0, 1]"),
    ("per_class zero", dict(per_class=0), "at least 1"),
    ("negative seed", dict(ratio=0.5, seed=-1), "non-negative"),
]


@pytest.mark.parametrize("kwargs,fragment", [c[1:] for c in FEW_SHOT_ERRORS], ids=[c[0] for c in FEW_SHOT_ERRORS])
def test_few_shot_errors(kwargs, fragment):
    with pytest.raises(UserError) as err:
        few_shot_indices(TARGETS, **kwargs)
    assert fragment in str(err.value)


def test_write_subset(folder, tmp_path):
    ds = open_dataset(str(folder))
    out = tmp_path / "subset.txt"
    write_subset(out, ds, [0, 4])
    assert out.read_text() == "train/cat/001.png\ntrain/dog/b.png\n"
    assert sorted(os.listdir(tmp_path)) == ["ds", "subset.txt"]  # no temporary file left behind


def test_transforms_match_model_input_size():
    model = tiny_vit(depth=2)
    img = Image.new("RGB", (28, 28), (10, 200, 30))
    train, evaluate = train_transform(model), eval_transform(model)
    assert train(img).shape == evaluate(img).shape == (3, 16, 16)
    names = [type(t).__name__ for t in train.transforms]
    assert "ColorJitter" not in names and "RandomErasing" not in names
    crop = train.transforms[0]
    assert crop.scale == (0.2, 1.0) and crop.interpolation.value == "bicubic"
    # the model's own normalisation (mean 0.5, std 0.5): a mid-grey image maps to about 0
    assert evaluate(Image.new("RGB", (16, 16), (128, 128, 128))).abs().max() < 0.01
