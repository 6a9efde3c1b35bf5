"""Tests for wecolora.teachers.vit: architecture round trips, loading teachers from names, folders and local weights."""
import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from wecolora.errors import UserError
from wecolora.teachers.load import _resolve_spec, load_model
from wecolora.teachers.vit import _args_from_modules, architecture, last_block_tokens, model_args, require_supported_vit

from conftest import tiny_vit


def _images(size: int = 16, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _save(model: nn.Module, folder) -> None:
    timm.models.save_for_hf(model, folder, safe_serialization=True, model_args=model_args(model))


# ---------------------------------------------------------------------------------------------
# model_args / architecture

ARCH_CASES = {
    # name: (architecture, create_model overrides)
    "tiny": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=10)),
    "avg-no-cls": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                                                class_token=False, global_pool="avg")),
    "no-qkv-bias-mlp2": ("vit_tiny_patch16_224", dict(img_size=(16, 24), patch_size=4, embed_dim=32, depth=2,
                                                      num_heads=2, qkv_bias=False, mlp_ratio=2.0, num_classes=0)),
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=4)),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4)),
}


@pytest.mark.parametrize("case", ARCH_CASES)
def test_model_args_rebuild_the_architecture(case):
    name, overrides = ARCH_CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **overrides).eval()
    assert architecture(model) == name
    args = model_args(model)
    assert args["depth"] == len(model.blocks)
    assert not isinstance(args["img_size"], tuple)  # lists survive yaml/json round trips unchanged
    rebuilt = timm.create_model(architecture(model), pretrained=False, **args).eval()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images))
    # a shallower copy is the same thing with fewer blocks
    shallow = timm.create_model(name, pretrained=False, **dict(args, depth=1))
    assert len(shallow.blocks) == 1 and shallow.embed_dim == model.embed_dim


def test_architecture_needs_a_timm_model():
    model = tiny_vit(depth=1)
    model.pretrained_cfg = {}
    with pytest.raises(UserError, match="architecture"):
        architecture(model)
    with pytest.raises(UserError, match="timm.create_model"):
        architecture(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# load_model from folders

def test_load_model_local_dir(tmp_path):
    model = tiny_vit(depth=2)
    _save(model, tmp_path / "m")
    for spec in (f"local-dir:{tmp_path / 'm'}", str(tmp_path / "m")):
        loaded = load_model(spec)
        assert type(loaded) is timm.models.VisionTransformer and not loaded.training
        assert _same_state(loaded, model)
        with torch.no_grad():
            torch.testing.assert_close(loaded(_images()), model(_images()))


def test_load_model_run_folder_resolves_to_student(tmp_path):
    run = tmp_path / "run"
    student = tiny_vit(depth=3)
    _save(student, run / "student")
    (run / "config.yaml").write_text("mode: wecolora\n")
    assert _resolve_spec(str(run)) == f"local-dir:{run / 'student'}"
    loaded = load_model(str(run))
    assert len(loaded.blocks) == 3 and _same_state(loaded, student)


def test_load_model_overrides_from_folder(tmp_path):
    _save(tiny_vit(depth=1), tmp_path / "m")
    loaded = load_model(f"local-dir:{tmp_path / 'm'}", img_size=32, num_classes=0)
    assert loaded.patch_embed.img_size == (32, 32)
    assert loaded.pos_embed.shape[1] == 1 + (32 // 4) ** 2  # resized by timm
    assert isinstance(loaded.head, nn.Identity)


LOAD_ERRORS = [
    # (spec builder from tmp_path, text the message must contain)
    (lambda tmp: "not_a_model_xyz", "unknown model"),
    (lambda tmp: str(tmp / "missing_run"), "unknown model"),
    (lambda tmp: f"local-dir:{tmp / 'missing'}", "does not exist"),
    (lambda tmp: str(tmp), "without config.json"),
    (lambda tmp: "vit_tiny_patch16_224.no_such_tag", "cannot load model"),
    (lambda tmp: "hf-hub:wecolora-tests/does-not-exist", "offline"),
]


@pytest.mark.parametrize("make_spec, message", LOAD_ERRORS)
def test_load_model_refuses(tmp_path, make_spec, message):
    with pytest.raises(UserError, match=message):
        load_model(make_spec(tmp_path))


def test_load_model_missing_weights_file(tmp_path):
    with pytest.raises(UserError, match="--teacher-weights .* does not exist"):
        load_model("vit_tiny_patch16_224", weights=str(tmp_path / "nope.safetensors"))


def test_load_model_refuses_unsupported_layout(tmp_path):
    args = dict(img_size=28, depth=1)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **args)
    timm.models.save_for_hf(eva, tmp_path / "eva", safe_serialization=True, model_args=args)
    with pytest.raises(UserError, match="not a timm VisionTransformer; supported"):
        load_model(str(tmp_path / "eva"))


# ---------------------------------------------------------------------------------------------
# load_model with local weights (timm's pretrained_cfg_overlay=dict(file=...) path)

@pytest.fixture(scope="module")
def vit_tiny_file(tmp_path_factory):
    """A random, real-shaped vit_tiny_patch16_224 (5.7M parameters) saved with safetensors."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    torch.save(model.state_dict(), path.with_suffix(".pth"))
    return model, path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_model_local_weights(vit_tiny_file, suffix):
    model, path = vit_tiny_file
    loaded = load_model("vit_tiny_patch16_224", weights=str(path.with_suffix(suffix)))
    assert _same_state(loaded, model) and not loaded.training


def test_load_model_local_weights_with_overrides(vit_tiny_file):
    model, path = vit_tiny_file
    loaded = load_model("vit_tiny_patch16_224", weights=str(path), img_size=32, num_classes=0)
    assert loaded.pos_embed.shape == (1, 1 + 4, 192)  # 14x14 grid resampled to 2x2
    assert isinstance(loaded.head, nn.Identity)
    assert torch.equal(loaded.cls_token, model.cls_token)
    assert torch.equal(loaded.blocks[7].attn.qkv.weight, model.blocks[7].attn.qkv.weight)
    assert torch.equal(loaded.norm.weight, model.norm.weight)


def test_load_model_wrong_shaped_weights(tmp_path):
    """load_model forwards only img_size/num_classes, so a tiny-overridden file cannot load into the
    registered architecture; it must say so as a UserError."""
    tiny = tiny_vit(depth=2)
    safetensors.torch.save_file(tiny.state_dict(), tmp_path / "tiny.safetensors")
    with pytest.raises(UserError, match="cannot load .*tiny.safetensors into vit_tiny_patch16_224"):
        load_model("vit_tiny_patch16_224", weights=str(tmp_path / "tiny.safetensors"), img_size=16)


@pytest.mark.parametrize("num_classes, head_loaded", [(1000, True), (10, False)])
def test_timm_file_overlay_loads_into_overridden_architecture(tmp_path, num_classes, head_loaded):
    """The mechanism load_model relies on also works with architecture overrides (passed straight to timm)."""
    tiny = tiny_vit(depth=2, num_classes=1000)
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(tiny.state_dict(), path)
    torch.manual_seed(123)
    # the overlay load_model passes (a state dict read by wecolora); a `file` overlay would hit timm < 1.0.31's
    # custom (npz) loader of this architecture's default weights
    overlay = dict(source="", state_dict=safetensors.torch.load_file(path), file=None)
    loaded = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay,
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=num_classes,
    )
    body = {k: v for k, v in tiny.state_dict().items() if not k.startswith("head.")}
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in body.items())
    # a head of another size than the pretrained config's (1000) is dropped and re-initialised by timm
    assert (loaded.head.weight.shape == tiny.head.weight.shape
            and torch.equal(loaded.head.weight, tiny.head.weight)) is head_loaded


# ---------------------------------------------------------------------------------------------
# require_supported_vit and last_block_tokens

def test_require_supported_vit_refuses_non_standard_blocks():
    model = tiny_vit(depth=2)
    require_supported_vit(model)
    model.blocks[1].mlp = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(UserError, match="block 1"):
        require_supported_vit(model)


@pytest.mark.parametrize("overrides", [{}, dict(class_token=False, global_pool="avg"), dict(reg_tokens=2)])
def test_last_block_tokens(overrides):
    model = tiny_vit(depth=3, **overrides)
    images = _images()
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        outs = []
        for block in model.blocks:
            x = block(x)
            outs.append(x)
        (last,) = last_block_tokens(model, images)
        first, second = last_block_tokens(model, images, [0, 1])
        (normed,) = last_block_tokens(model, images, norm=True)
    assert last.shape == (2, model.num_prefix_tokens + 16, 32)
    torch.testing.assert_close(last, outs[-1])
    torch.testing.assert_close(first, outs[0])
    torch.testing.assert_close(second, outs[1])
    torch.testing.assert_close(normed, model.forward_features(images))


@pytest.mark.parametrize("overrides", [{}, dict(reg_tokens=2, no_embed_class=True, init_values=1e-5),
                                       dict(class_token=False, global_pool="avg", mlp_ratio=3.0, qkv_bias=False)])
def test_args_rebuilt_from_modules_rebuild_the_model(overrides):
    """timm < 1.0.31 has no get_model_args: the arguments read back from the modules rebuild the same ViT."""
    model = tiny_vit(depth=2, **overrides)
    args = dict(_args_from_modules(model), depth=2)
    rebuilt = timm.create_model(architecture(model), pretrained=False, **args).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images))
