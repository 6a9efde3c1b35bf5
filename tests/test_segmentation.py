"""The dense probe (evaluation/segmentation.py) and its data (data/segmentation.py): mIoU by hand, a head on
planted features, the built-in canvases, image + mask folders and their bad inputs, the command line."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.nn import functional as F

from wecolora.cli import main
from wecolora.config import ProbeConfig
from wecolora.data.layout import check_dataset, check_segmentation_dataset, is_segmentation_set
from wecolora.data.segmentation import ITEM_THRESHOLD, builtin_pairs, compose_canvases, open_segmentation
from wecolora.data.transforms import SegmentationTransform
from wecolora.errors import UserError
from wecolora.evaluation.features import patch_tokens
from wecolora.evaluation.metrics import confusion_matrix, segmentation_metrics
from wecolora.evaluation.probe import probe
from wecolora.evaluation.segmentation import train_segmentation_probe, upsample
from wecolora.teachers.vit import model_args



@pytest.fixture(autouse=True)
def one_thread():
    """Tensors here are tiny: a second intra-op thread only waits (15x slower on 2 busy cores, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the metric


def test_miou_by_hand():
    """3 classes, 255 ignored. Truth / prediction per pixel:
    truth      0 0 1 1 2 255    class 0: TP 2, FP 1 (pixel 5 predicted 0), FN 0 -> IoU 2/3
    predicted  0 0 1 2 2 0      class 1: TP 1, FP 0, FN 1 -> 1/2;  class 2: TP 1, FP 1, FN 0 -> 1/2
    (the ignored pixel's prediction counts nowhere, so class 0 has no FP from it: IoU 2/2 = 1)."""
    truth = torch.tensor([[0, 0, 1, 1, 2, 255]])
    predicted = torch.tensor([[0, 0, 1, 2, 2, 0]])
    confusion = confusion_matrix(predicted, truth, 3)
    assert confusion.tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 1]]
    metrics = segmentation_metrics(confusion, ["bg", "a", "b"])
    assert metrics["per_class_iou"] == {"bg": 1.0, "a": 0.5, "b": 0.5}
    assert metrics["miou"] == pytest.approx(2 / 3) and metrics["pixel_accuracy"] == pytest.approx(4 / 5)
    # A class neither present nor predicted has no IoU and stays out of the mean.
    absent = segmentation_metrics(confusion_matrix(predicted, truth, 4))
    assert absent["per_class_iou"]["3"] is None and absent["miou"] == pytest.approx(2 / 3)
    with pytest.raises(UserError, match="no labelled pixel"):
        segmentation_metrics(confusion_matrix(predicted, torch.full_like(truth, 255), 3))


def test_upsample_is_torch_bilinear():
    for grid, size in (((8, 8), (56, 56)), ((3, 5), (17, 40))):
        logits = torch.randn(2, 4, *grid)
        expected = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        assert torch.allclose(upsample(logits, size), expected, atol=1e-5)


# ---------------------------------------------------------------- the head on planted features


def _planted(n: int, informative: bool, seed: int = 0):
    """4x4 token maps and 16x16 masks: each row of tokens holds one class (of 4, equally frequent), painted on
    its 4-pixel stripe of the mask, one pixel an image ignored. Informative tokens carry their class:
    orthogonal centres of equal norm, plus a little noise. Rows, so that bilinear upsampling blends two
    classes at most: with the head's margins alike, each pixel goes to the nearer token row."""
    g = torch.Generator().manual_seed(seed)
    token_classes = torch.randint(0, 4, (n, 4, 1), generator=g).expand(n, 4, 4)
    centres = 3 * torch.eye(8)[:4]
    tokens = centres[token_classes].permute(0, 3, 1, 2) + 0.05 * torch.randn(n, 8, 4, 4, generator=g)
    if not informative:
        tokens = torch.randn(n, 8, 4, 4, generator=g)
    masks = token_classes.repeat_interleave(4, 1).repeat_interleave(4, 2).to(torch.uint8).contiguous()
    masks[:, 0, 0] = 255
    return tokens.half(), masks


def test_a_head_on_planted_features_reaches_a_known_miou():
    train, test = _planted(160, True), _planted(40, True, seed=1)
    result = train_segmentation_probe(*train, *test, num_classes=4, class_names=["bg", "a", "b", "c"], epochs=15)
    # Tokens that name their class: the upsampled logits' argmax is the nearest token's class on every pixel.
    assert result["miou"] == 1.0 and result["pixel_accuracy"] == 1.0 and not result["under_trained"]
    assert result["lr_source"] == "sweep" and len(result["lr_sweep"]) == 5 and result["sweep_holdout"] == 32
    assert result["lr"] == max(result["lr_sweep"], key=lambda r: (r["miou"], -r["loss"]))["lr"]
    assert result["token_grid"] == [4, 4] and result["feature_dim"] == 8 and result["n_train"] == 160

    # Tokens that carry nothing: the head can only learn the class frequencies (its bias), so it predicts the
    # most frequent training class everywhere: that class's IoU is its share of the test pixels, the others 0.
    noise_train, noise_test = _planted(160, False), _planted(40, False, seed=1)
    noise_train[1][:, 8:] = 0  # the lower half of every training mask is class 0: the most frequent
    result = train_segmentation_probe(*noise_train, *noise_test, num_classes=4, epochs=10, lr=5.0)
    labelled = noise_test[1][noise_test[1] != 255]
    share = (labelled == 0).float().mean().item()
    assert result["per_class_iou"] == {"0": pytest.approx(share), "1": 0.0, "2": 0.0, "3": 0.0}
    assert result["miou"] == pytest.approx(share / 4) and result["pixel_accuracy"] == pytest.approx(share)


def test_an_under_trained_segmentation_head_is_flagged(caplog):
    result = train_segmentation_probe(*_planted(64, True), *_planted(16, True, seed=1), num_classes=4, epochs=2,
                                      lr=1e-4)  # fmt: skip
    assert result["under_trained"] and result["lr_source"] == "given"
    assert "under-trained" in caplog.text


# ---------------------------------------------------------------- the built-in canvases


def test_builtin_canvases_are_deterministic_and_their_masks_match_their_pixels():
    canvases, masks, classes = builtin_pairs("mnist-5k-seg", "test")
    builtin_pairs.cache_clear()
    again, again_masks, _ = builtin_pairs("mnist-5k-seg", "test")
    assert np.array_equal(canvases, again) and np.array_equal(masks, again_masks)
    assert canvases.shape == (500, 56, 56) and classes[0] == "background" and len(classes) == 11
    assert np.array_equal(masks > 0, canvases >= ITEM_THRESHOLD)  # labelled exactly where an item is bright
    assert masks.max() <= 10 and (masks > 0).any(1).any(1).all()  # every canvas holds an item
    train, _, _ = builtin_pairs("mnist-5k-seg", "train")
    assert len(train) == 1000 and not np.array_equal(train[:500], canvases)  # train and test differ


def test_items_are_placed_without_overlap():
    # 10x10 squares with distinct labels: an overlap would leave a label with a count not a multiple of 100.
    items = np.full((6, 10, 10), 200, np.uint8)
    canvases, masks = compose_canvases(items, np.arange(6), 50, size=30, seed=3, items=(3, 5))
    counts = np.stack([(masks == label + 1).sum((1, 2)) for label in range(6)], 1)
    assert (counts % 100 == 0).all() and (counts.sum(1) >= 100).all()
    assert (counts.sum(1) > 100).any()  # several items per canvas
    other, _ = compose_canvases(items, np.arange(6), 50, size=30, seed=4, items=(3, 5))
    assert not np.array_equal(canvases, other)


def test_the_transform_keeps_class_indices():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)).convert("RGB")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20], mask[0, 0] = 7, 255
    pixels, labels = SegmentationTransform((40, 40), [0.5] * 3, [0.25] * 3)(image, mask)
    assert pixels.shape == (3, 40, 40) and pixels.dtype == torch.float32 and labels.shape == (40, 40)
    assert set(labels.unique().tolist()) == {0, 7, 255}  # nearest neighbours: no blended index


# ---------------------------------------------------------------- folders and bad input


def _pair(folder, stem, size=(12, 12), mask_size=None, value=1, mode="L"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 120, np.uint8)).save(folder / "images" / f"{stem}.png")
    if mask_size is not False:
        mask = np.zeros(mask_size or size, np.uint8)
        mask[2:6, 2:6] = value
        Image.fromarray(mask).convert(mode).save(folder / "masks" / f"{stem}.png")


def _folder(tmp_path, count=10):
    root = tmp_path / "seg"
    for split in ("train", "test"):
        for i in range(count):
            _pair(root / split, f"{split}{i}", value=1 + i % 2)
    return root


def test_a_folder_of_pairs_opens_with_its_classes(tmp_path):
    root = _folder(tmp_path)
    assert is_segmentation_set(str(root)) and not is_segmentation_set("mnist-5k")
    check_segmentation_dataset(str(root))
    train = open_segmentation(str(root), "train")
    assert len(train) == 10 and train.classes == ["0", "1", "2"] and train.sample_ids[0] == "train/images/train0.png"
    (root / "classes.txt").write_text("background\ncat\ndog\nbird\n")
    assert open_segmentation(str(root), "test").classes == ["background", "cat", "dog", "bird"]
    image, mask = train[1]
    assert image.mode == "RGB" and mask.dtype == np.uint8 and mask.max() == 2


def test_bad_pairs_are_skipped_and_counted_or_stop_the_run(tmp_path):
    root = _folder(tmp_path, count=20)
    _pair(root / "train", "nomask", mask_size=False)  # an image without a mask
    _pair(root / "train", "small", mask_size=(6, 6))  # a mask of another size than its image
    train = open_segmentation(str(root), "train", max_unreadable=0.2)
    assert len(train) == 20 and sorted(train.skipped) == ["train/images/nomask.png (no mask)",
                                                          "train/images/small.png (mask 6x6 but image 12x12)"]
    with pytest.raises(UserError, match="2 of the 22 images .* have no usable mask"):
        open_segmentation(str(root), "train", max_unreadable=0.05)


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "classes.txt").write_text("a\nb\nc\n") and _pair(root / "test", "x", value=5),
     "holds class index 5 but the set declares 3 classes"),
    (lambda root: _pair(root / "test", "rgb", mode="RGB"), "is a RGB image: masks must hold one channel"),
])
def test_masks_beyond_the_classes_or_not_indices_stop_with_one_line(tmp_path, make, message):
    root = _folder(tmp_path)
    make(root)
    with pytest.raises(UserError, match=message):
        open_segmentation(str(root), "test", classes=None)


def test_layout_errors_name_the_fix(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(UserError, match="segmentation set: probe it with wecolora probe --task segmentation"):
        check_dataset(str(root), ("train", "test"))
    with pytest.raises(UserError, match="--task segmentation"):
        check_dataset("fashion-mnist-seg")
    with pytest.raises(UserError, match="is a classification set"):
        check_segmentation_dataset("mnist-5k")
    (root / "test" / "masks").rename(root / "test" / "labels")
    with pytest.raises(UserError, match="has no masks/ folder"):
        check_segmentation_dataset(str(root))
    for settings, message in ((dict(protocol="mae"), "cached with --task segmentation"),
                              (dict(train_per_class=5), "none with --task segmentation")):
        with pytest.raises(UserError, match=message):
            ProbeConfig(task="segmentation", **settings)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random-weights 2-block ViT for 28 px images (patch 7), saved as a timm folder."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, embed_dim=32,
                              depth=2, num_heads=2, num_classes=0)  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny")
    timm.models.save_for_hf(model, folder, safe_serialization=True, model_args=model_args(model))
    return f"local-dir:{folder}"


def test_patch_tokens_are_the_final_norm_tokens_on_the_grid():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, embed_dim=32,
                              depth=1, num_heads=2, num_classes=0, reg_tokens=2).eval()  # fmt: skip
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        maps, tokens = patch_tokens(model, images), model.forward_features(images)
    assert maps.shape == (2, 32, 4, 4) and model.num_prefix_tokens == 3
    assert torch.equal(maps[:, :, 1, 2], tokens[:, 3 + 1 * 4 + 2])  # row 1, column 2 after the 3 prefix tokens


def test_probe_task_segmentation_end_to_end(tiny_model, tmp_path, capsys):
    root = _folder(tmp_path, count=12)
    out = tmp_path / "probe"
    code = main(["probe", "--task", "segmentation", "--model", tiny_model, "--data", str(root), "--output", str(out),
                 "--device", "cpu", "--epochs", "3", "--lr", "5", "--cache-dir", str(tmp_path / "cache")])
    assert code == 0 and "mIoU" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["miou"] <= 1 and 0 <= results["pixel_accuracy"] <= 1
    assert set(results["per_class_iou"]) == {"0", "1", "2"} and results["task"] == "segmentation"
    assert results["img_size"] == [28, 28] and results["token_grid"] == [4, 4]
    assert results["token_bytes"] == 24 * 32 * 16 * 2 and not results["features_cached"]  # fp16 tokens
    again = probe(tiny_model, str(root), str(tmp_path / "again"), task="segmentation", epochs=3, lr=5.0, device="cpu",
                  cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert again["features_cached"] and again["miou"] == results["miou"]
    # The built-in canvases at their 56 px: the model's position embedding is resized (8 x 8 tokens).
    built_in = probe(tiny_model, "mnist-5k-seg", str(tmp_path / "builtin"), task="segmentation", epochs=1, lr=5.0,
                     device="cpu", cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert built_in["token_grid"] == [8, 8] and built_in["n_train"] == 1000 and built_in["n_test"] == 500
    assert main(["probe", "--model", tiny_model, "--data", "mnist-5k-seg", "--output", str(tmp_path / "x")]) == 2
    assert "--task segmentation" in capsys.readouterr().err
