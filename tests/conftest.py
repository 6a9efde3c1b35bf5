import os

# Tests never touch a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402


def tiny_vit(depth: int = 6, **overrides):
    """A tiny timm ViT (width 32, 4 heads, 16 px input, 4 px patches: 17 tokens) with random weights."""
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=4, num_classes=10)
    args.update(overrides)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


@pytest.fixture
def teacher():
    return tiny_vit()
