import contextlib
import os

# Tests never touch a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Caches (teacher tokens, probe features) go to a folder of this test session, never ~/.cache.
os.environ.setdefault("WECOLORA_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="wecolora-test-cache-"))

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from wecolora.data.datasets import open_dataset
from wecolora.data.subset import few_shot_indices
from wecolora.data.transforms import eval_transform
from wecolora.evaluation.features import extract_features


def tiny_vit(depth: int = 6, **overrides):
    """A tiny timm ViT (width 32, 4 heads, 16 px input, 4 px patches: 17 tokens) with random weights."""
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=4, num_classes=10)
    args.update(overrides)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


@pytest.fixture
def teacher():
    return tiny_vit()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A saved 6-block tiny ViT for 28 px digits (patch 7: 17 tokens), loadable as ``local-dir:``."""
    from timm.models import save_for_hf

    from wecolora.teachers.vit import model_args

    model = tiny_vit(img_size=28, patch_size=7)
    folder = tmp_path_factory.mktemp("teacher") / "vit"
    save_for_hf(model, folder, safe_serialization=True, model_args=model_args(model))
    return folder


def probe_on_fixed_fashion_slice(teacher, **settings) -> dict:
    """Linear probe of a bundled teacher: 300 training images per class, the first 2,000 test images."""
    from wecolora.evaluation.probe import train_linear_probe

    transform = eval_transform(teacher)
    train = open_dataset("fashion-mnist", "train", transform=transform)
    test = open_dataset("fashion-mnist", "test", transform=transform)
    train_slice = torch.utils.data.Subset(train, few_shot_indices(train.targets, per_class=300, seed=0))
    test_slice = torch.utils.data.Subset(test, range(2000))  # a fixed 2,000-image test slice
    train_x, train_y = extract_features(teacher, train_slice, batch_size=500)
    test_x, test_y = extract_features(teacher, test_slice, batch_size=500)
    return train_linear_probe(train_x, train_y, test_x, test_y, num_classes=10, **settings)


class Interrupted(Exception):
    """Raised in place of a kill right after a run writes its first checkpoint."""


@contextlib.contextmanager
def interrupted_after_first_checkpoint(monkeypatch, module):
    """Inside the block, the first checkpoint ``module`` saves is written and then the run stops, as if killed."""
    real_save = module.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(Interrupted):
            yield
    finally:
        monkeypatch.setattr(module, "save_checkpoint", real_save)
