import json

import numpy as np
import pytest
import timm
import torch
from sklearn.metrics import roc_auc_score
from timm.models.vision_transformer import VisionTransformer

from wecolora import UserError
from wecolora.evaluation.features import extract_features, pool_tokens
from wecolora.evaluation.knn import knn, knn_classify
from wecolora.evaluation.metrics import classification_metrics, multilabel_auc
from wecolora.config import ProbeConfig
from wecolora.evaluation.probe import (
    RULE_MIN_TRAIN,
    SWEEP_LRS,
    linear_head,
    probe,
    probe_optimizer,
    resolve_settings,
    split_validation,
    train_linear_probe,
)
from wecolora.evaluation.reports import report, write_report
from wecolora.evaluation.splits import write_results
from wecolora.teachers.vit import model_args


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random-weights ViT for 28x28 images (patch 7: 17 tokens, width 64, 2 blocks) saved as a timm folder."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7,
                              embed_dim=64, depth=2, num_heads=4, num_classes=0)  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny_vit")
    timm.models.save_for_hf(model, folder, safe_serialization=True, model_args=model_args(model))
    return f"local-dir:{folder}"


def _clusters(n_per_class, classes=3, dim=16, seed=0):
    """Linearly separable features: well-separated class centres plus small noise."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


@pytest.mark.parametrize("settings", [
    dict(optimizer="sgd", epochs=20),
    dict(optimizer="lars", epochs=50, lr=1.0),  # the trust ratio moves the weights by ~0.1% x lr per step
])
def test_linear_probe_separable_features_reach_100(settings):
    x, y = _clusters(70)
    is_test = torch.arange(len(y)) % 7 < 2  # 20 test images per class
    train_x, train_y, test_x, test_y = x[~is_test], y[~is_test], x[is_test], y[is_test]
    result = train_linear_probe(train_x, train_y, test_x, test_y, batch_size=32, val_fraction=0.2, **settings)
    assert result["top1"] == 1.0 and result["val_top1"] == 1.0 and result["optimizer"] == settings["optimizer"]
    assert (result["n_train"], result["n_val"], result["n_test"]) == (120, 30, 60)


@pytest.mark.parametrize("n_train, settings, expected", [
    # ImageNet-1K's 1,281,167 training images: MAE's rule, the paper's setting (no ImageNet needed).
    (1_281_167, {}, {"lr_source": "rule", "lr": 0.2, "batch_size": 512}),
    (RULE_MIN_TRAIN, {"batch_size": 1024}, {"lr_source": "rule", "lr": 0.4, "batch_size": 1024}),
    # Smaller sets: the lr is swept; the batch leaves every epoch at least 16 updates (at least 32 images).
    (RULE_MIN_TRAIN - 1, {}, {"lr_source": "sweep", "lr": None, "batch_size": 512}),
    (4000, {}, {"lr_source": "sweep", "lr": None, "batch_size": 250}),
    (1000, {}, {"lr_source": "sweep", "lr": None, "batch_size": 62}),
    (100, {}, {"lr_source": "sweep", "lr": None, "batch_size": 32}),
    (1000, {"batch_size": 256}, {"lr_source": "sweep", "lr": None, "batch_size": 256}),  # a given batch stays
    # A given lr is used as given, with the batch as before (512, capped at the set).
    (1000, {"lr": 4.0}, {"lr_source": "given", "lr": 4.0, "batch_size": 512}),
    (300, {"lr": 4.0}, {"lr_source": "given", "lr": 4.0, "batch_size": 300}),
    (1000, {"optimizer": "sgd"}, {"lr_source": "rule", "lr": 0.2, "batch_size": 512}),  # no trust ratio: the rule
])
def test_resolved_probe_settings(n_train, settings, expected):
    resolved = resolve_settings(n_train, ProbeConfig(**settings))
    assert {k: resolved[k] for k in expected} == expected
    assert resolved.get("lr_candidates") == (list(SWEEP_LRS) if expected["lr_source"] == "sweep" else None)
    assert resolved["epochs"] == 50 and resolved["warmup_epochs"] == 10


def test_the_lr_sweep_scores_held_aside_images_and_trains_on_the_whole_split():
    x, y = _clusters(50, classes=4)
    result = train_linear_probe(x, y, x, y, epochs=20)  # lr left out on 200 images: swept
    assert result["lr_source"] == "sweep" and result["top1"] == 1.0 and not result["under_trained"]
    assert [r["lr"] for r in result["lr_sweep"]] == list(SWEEP_LRS) and result["sweep_holdout"] == 40  # 20% per class
    # The best held-aside top-1; of equal ones (several lrs separate these clusters), the lowest held-aside loss.
    assert result["lr"] == max(result["lr_sweep"], key=lambda r: (r["top1"], -r["loss"]))["lr"]
    assert result["n_train"] == 200
    assert "lr_candidates" not in result
    with pytest.raises(UserError, match="too few to hold some aside for the lr sweep: give --lr"):
        two_a_class = torch.tensor([0, 1, 50, 51, 100, 101, 150, 151])  # round(2 x 20%) = 0 held aside a class
        train_linear_probe(x[two_a_class], y[two_a_class], x, y, epochs=2)


def test_an_under_trained_head_is_flagged(caplog):
    x, y = _clusters(50, classes=4)
    # MAE's rule on 200 images for 10 epochs: LARS moves the weights by about 0.02% a step, 60 steps.
    slow = train_linear_probe(x, y, x, y, epochs=10, lr=0.08, batch_size=32)
    assert slow["under_trained"] and slow["last_epoch_loss"] > 0.8 * slow["initial_loss"]
    assert "under-trained" in caplog.text and "leave --lr out" in caplog.text
    assert not train_linear_probe(x, y, x, y, epochs=10, lr=10.0, batch_size=32)["under_trained"]


def test_one_lars_step_scales_the_weight_update_by_the_trust_ratio_and_not_the_bias():
    """MAE's LARS at weight decay 0: w -= lr * 0.001 * |w| / |g| * g for the weight, b -= lr * g for the bias."""
    torch.manual_seed(0)
    head = linear_head(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    torch.nn.functional.cross_entropy(head(x), y).backward()
    weight, bias = head[1].weight, head[1].bias
    w0, gw, b0, gb = weight.detach().clone(), weight.grad.clone(), bias.detach().clone(), bias.grad.clone()
    lr = 0.5
    probe_optimizer(head, "lars", lr).step()
    assert torch.allclose(weight, w0 - lr * 0.001 * w0.norm() / gw.norm() * gw, atol=1e-7, rtol=0)
    assert torch.allclose(bias, b0 - lr * gb, atol=1e-7, rtol=0)
    head[1].weight.data, head[1].bias.data = w0.clone(), b0.clone()  # sgd: the plain step for both
    probe_optimizer(head, "sgd", lr).step()
    assert torch.allclose(weight, w0 - lr * gw, atol=1e-7, rtol=0)
    with pytest.raises(UserError, match="lars or sgd"):
        probe_optimizer(head, "adam", lr)


def test_linear_probe_multilabel_reports_auc():
    x, y = _clusters(40, classes=4)
    multi_hot = torch.nn.functional.one_hot(y, 4).float()
    multi_hot[y == 0, 3] = 1  # a second label on every class-0 image
    result = train_linear_probe(x, multi_hot, x, multi_hot, epochs=100, batch_size=32, lr=2.0)
    assert result["auc"] > 0.99 and result["top1"] == 1.0


def test_knn_on_identical_features_is_100():
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(1))
    scores = knn_classify(x, y, x, k=20, temperature=0.07, chunk_size=64)
    assert scores.shape == (200, 5)
    assert classification_metrics(scores, y)["top1"] == 1.0


@pytest.mark.parametrize("ties", [False, True])
def test_multilabel_auc_matches_sklearn(ties):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(300, 6))
    scores = np.round(scores, 1) if ties else scores
    targets = (rng.random((300, 6)) < 0.3).astype(np.float32)
    ours = multilabel_auc(torch.tensor(scores), torch.tensor(targets))
    assert ours == pytest.approx(roc_auc_score(targets, scores, average="macro"), abs=1e-12)


def test_split_validation_is_stratified_and_disjoint():
    y = torch.tensor([0] * 10 + [1] * 20)
    train, val = split_validation(y, 0.2, seed=0)
    assert len(val) == 6 and (y[val] == 0).sum() == 2
    assert sorted(train.tolist() + val.tolist()) == list(range(30))


def test_cls_pooling_without_class_token_uses_model_pooling():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                              depth=1, num_heads=2, num_classes=0, class_token=False,
                              global_pool="avg").eval()  # fmt: skip
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        pooled = pool_tokens(model, images, "cls")
        assert torch.allclose(pooled, model(images))
        assert torch.allclose(pool_tokens(model, images, "mean"), model.forward_features(images).mean(1))


def test_probe_protocols_agree_on_mnist_5k(tiny_model_dir, tmp_path):
    # MAE's LARS moves the weights by about 0.1% x lr per step: a 3-epoch probe needs a large lr.
    common = dict(epochs=3, batch_size=256, lr=10.0, val_fraction=0.1, device="cpu", cache_dir=tmp_path / "cache")
    cached = probe(tiny_model_dir, "mnist-5k", str(tmp_path / "cached"), protocol="cached", **common)
    mae = probe(tiny_model_dir, "mnist-5k", str(tmp_path / "mae"), protocol="mae", **common)
    assert abs(cached["top1"] - mae["top1"]) <= 0.02
    assert cached["top1"] > 0.25  # random-weight CLS features of digits: about 0.4, chance is 0.1
    written = json.loads((tmp_path / "cached" / "results.json").read_text())
    assert {"top1", "top5", "val_top1", "n_train", "n_test", "protocol", "epochs", "feature_dim", "seconds",
            "model", "data", "optimizer"} <= written.keys()  # fmt: skip
    assert written["optimizer"] == "lars" and mae["optimizer"] == "lars"  # MAE's probe is the default
    assert (written["n_train"], written["n_val"], written["n_test"], written["feature_dim"]) == (3600, 400, 1000, 64)
    assert 0 <= written["top1"] <= 1 and written["protocol"] == "cached"


def test_probe_on_few_images_per_class_extracts_and_caches_only_those(tiny_model_dir, tmp_path):
    common = dict(epochs=3, batch_size=64, train_per_class=10, device="cpu", cache_dir=tmp_path / "cache")
    first = probe(tiny_model_dir, "mnist-5k", str(tmp_path / "first"), **common)
    cached = probe(tiny_model_dir, "mnist-5k", str(tmp_path / "cached"), **common)
    mae = probe(tiny_model_dir, "mnist-5k", str(tmp_path / "mae"), protocol="mae", **common)
    assert not first["features_cached"] and cached["features_cached"]
    assert first["top1"] == cached["top1"] and cached["n_train"] == mae["n_train"] == 100
    other = probe(tiny_model_dir, "mnist-5k", str(tmp_path / "other"), **{**common, "train_per_class": 20})
    assert not other["features_cached"] and other["n_train"] == 200  # another choice is another cache entry
    assert cached["top1"] == pytest.approx(mae["top1"], abs=0.02)


def test_feature_cache_is_reused(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    original = VisionTransformer.forward_features
    counting = lambda self, x: calls.append(len(x)) or original(self, x)  # noqa: E731
    monkeypatch.setattr(VisionTransformer, "forward_features", counting)
    options = dict(device="cpu", cache_dir=tmp_path / "cache", extract_batch_size=1000)
    first = knn(tiny_model_dir, "mnist-5k", str(tmp_path / "a"), k=10, **options)
    assert sum(calls) == 5000 and not first["features_cached"]
    calls.clear()
    second = knn(tiny_model_dir, "mnist-5k", str(tmp_path / "b"), k=10, **options)
    assert calls == [] and second["features_cached"]
    assert second["top1"] == first["top1"] and second["protocol"] == "knn" and second["n_train"] == 4000


def test_report_over_two_runs(tmp_path):
    runs = []
    for name, top1 in (("student", 0.8125), ("teacher", 0.9)):
        write_results(tmp_path / name, {"top1": top1, "top5": 0.99, "n_train": 40, "n_test": 10,
                                                 "protocol": "cached", "model": name, "data": "mnist-5k"})  # fmt: skip
        runs.append(str(tmp_path / name))
    markdown = write_report(runs, str(tmp_path / "report"))
    lines = markdown.splitlines()
    assert lines[0] == "| run | model | data | protocol | top1 % | top5 % | n_train | n_test |"
    assert lines[2].endswith("| student | mnist-5k | cached | 81.25 | 99.00 | 40 | 10 |") and len(lines) == 4
    csv_lines = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert csv_lines[0] == "run,model,data,protocol,top1,top5,n_train,n_test"
    assert csv_lines[1].endswith(",0.8125,0.99,40,10")
    assert (tmp_path / "report" / "report.md").read_text() == markdown


BAD_INPUTS = [
    (dict(protocol="online"), "cached, mae"),
    (dict(pooling="max"), "cls, mean"),
    (dict(epochs=0), "epochs"),
    (dict(val_fraction=1.0), "val-fraction"),
    (dict(augment=True), "protocol mae"),
    (dict(optimizer="adam"), "lars, sgd"),
    (dict(epoch=3), "unknown setting"),
    (dict(model_spec="/no/such/model"), "unknown model"),
    (dict(data="/no/such/data"), "built-in"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS)
def test_probe_rejects_bad_input(tiny_model_dir, tmp_path, overrides, message):
    args = {"model_spec": tiny_model_dir, "data": "mnist-5k", "output": str(tmp_path / "out"), "device": "cpu"}
    args.update(overrides)
    with pytest.raises(UserError, match=message):
        probe(**args)
    assert not (tmp_path / "out").exists()


def test_knn_and_extraction_reject_bad_input(tmp_path):
    with pytest.raises(UserError, match="k"):
        knn_classify(torch.randn(4, 2), torch.zeros(4), torch.randn(1, 2), k=0)
    with pytest.raises(UserError, match="no images"):
        extract_features(torch.nn.Identity(), torch.utils.data.TensorDataset(torch.empty(0, 3)))
    with pytest.raises(UserError, match="results.json"):
        report([str(tmp_path)])
