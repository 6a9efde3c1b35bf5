"""Teachers from Hugging Face transformers folders: the converted timm ViT computes what the original does."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from wecolora.errors import UserError
from wecolora.teachers.hf_transformers import transformers_folder
from wecolora.teachers.load import load_model, model_shape
from wecolora.teachers.specs import check_model_spec
from wecolora.teachers.vit import last_block_tokens

transformers = pytest.importorskip("transformers")

SIZES = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
             patch_size=8)
# DINOv2 sizes its MLP with mlp_ratio (intermediate_size is ignored) and is shown 32 px images although
# its config says 48: transformers resizes the position embedding at every forward, wecolora once.
DINO_PREPROCESSING = {"do_resize": True, "size": {"shortest_edge": 40}, "do_center_crop": True,
                      "crop_size": {"height": 32, "width": 32}, "image_mean": [0.1, 0.2, 0.3],
                      "image_std": [0.4, 0.5, 0.6], "resample": 3}
# model_type, config class, model class saved, extra config, preprocessor_config.json (None: none), input size.
# Every type runs at a size its config does not say, so its position grid is resized (grown or shrunk) as
# real checkpoints are (DINOv2's 518 px config at 224 px): vit and vit_mae 4x4 -> 6x6, deit 4x4 -> 2x2,
# dinov2 6x6 -> 4x4, dinov2_with_registers 8x8 -> 4x4 (the one transformers resizes with antialiasing).
TEST_CASES = [
    ("vit", "ViTConfig", "ViTForImageClassification", {"num_labels": 5}, None, 48),
    ("deit", "DeiTConfig", "DeiTModel", {}, None, 16),
    ("vit_mae", "ViTMAEConfig", "ViTMAEForPreTraining", {"mask_ratio": 0.0, "decoder_hidden_size": 16,
                                                         "decoder_num_hidden_layers": 1,
                                                         "decoder_intermediate_size": 32}, None, 48),
    ("dinov2", "Dinov2Config", "Dinov2Model", {"image_size": 48, "mlp_ratio": 3, "layerscale_value": 0.5},
     DINO_PREPROCESSING, 32),
    ("dinov2_with_registers", "Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
     {"num_register_tokens": 2, "layer_norm_eps": 1e-5, "image_size": 64}, None, 32),
]


def save_transformers_model(folder, config_class, model_class, extra, preprocessor=None):
    """A small random transformers model saved with save_pretrained; returns its encoder (eval mode).

    Every tensor is redrawn (norms included), so that a swapped or missed weight shows in the outputs.
    """
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SIZES, **extra})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    for name in ("vit", "deit", "dinov2"):  # the encoder inside a model with a head or a decoder
        model = getattr(model, name, model)
    return model


def reference_tokens(model, images):
    """(last block output before the final norm, CLS after it) of a transformers encoder, in input order, at
    the images' size (the position embedding interpolated by transformers itself)."""
    kwargs = {}
    if model.config.model_type == "vit_mae":
        # MAE shuffles patches by argsort(noise) before dropping; increasing noise keeps the input order.
        kwargs["noise"] = torch.arange((images.shape[-1] // model.config.patch_size) ** 2,
                                       dtype=torch.float).expand(len(images), -1)
    if model.config.model_type in ("vit", "deit", "vit_mae"):  # DINOv2 models always interpolate
        kwargs["interpolate_pos_encoding"] = True
    out = model(pixel_values=images, output_hidden_states=True, **kwargs)
    return out.hidden_states[-1], out.last_hidden_state[:, 0]


@pytest.mark.parametrize("model_type, config_class, model_class, extra, preprocessor, size", TEST_CASES,
                         ids=[case[0] for case in TEST_CASES])
def test_converted_teacher_computes_what_transformers_computes(tmp_path, model_type, config_class, model_class, extra,
                                                               preprocessor, size):
    reference = save_transformers_model(tmp_path, config_class, model_class, extra, preprocessor)
    assert transformers_folder(str(tmp_path)) == tmp_path
    assert size != reference.config.image_size  # the position grid is resized
    teacher = load_model(str(tmp_path), img_size=None if preprocessor else size)  # DINOv2's size: its preprocessing
    assert teacher.patch_embed.img_size == (size, size)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        tokens, cls = reference_tokens(reference, images)
        converted = last_block_tokens(teacher, images)[0]
        converted_cls = teacher.forward_features(images)[:, 0]
    assert converted.shape == tokens.shape  # same prefix tokens (class, distillation, registers) and patches
    torch.testing.assert_close(converted, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted_cls, cls, rtol=1e-5, atol=1e-5)
    # the student path rebuilds the architecture from the name and arguments alone
    meta = model_shape(str(tmp_path), img_size=None if preprocessor else size)
    assert [p.shape for p in meta.parameters()] == [p.shape for p in teacher.parameters()]
    assert teacher.num_classes == 0


def test_preprocessing_comes_from_the_folder_or_the_model_type_defaults(tmp_path):
    save_transformers_model(tmp_path / "dino", "Dinov2Config", "Dinov2Model", {"image_size": 48}, DINO_PREPROCESSING)
    data = timm.data.resolve_model_data_config(load_model(f"hf-transformers:{tmp_path / 'dino'}"))
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == pytest.approx(32 / 40)
    assert data["mean"] == (0.1, 0.2, 0.3) and data["std"] == (0.4, 0.5, 0.6) and data["interpolation"] == "bicubic"
    save_transformers_model(tmp_path / "deit", "DeiTConfig", "DeiTModel", {})
    data = timm.data.resolve_model_data_config(load_model(str(tmp_path / "deit")))
    assert data["input_size"] == (3, 32, 32) and data["mean"] == (0.485, 0.456, 0.406)


def test_unmappable_folders_are_refused_in_one_line(tmp_path):
    save_transformers_model(tmp_path, "ViTConfig", "ViTModel", {"hidden_act": "gelu_new"})
    with pytest.raises(UserError, match="hidden_act 'gelu_new'"):
        check_model_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "swin"}))
    with pytest.raises(UserError, match="model_type 'swin' is not supported"):
        load_model(f"hf-transformers:{tmp_path}")


def cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "wecolora", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_refuses_an_unsupported_model_type_with_exit_2(tmp_path):
    folder = tmp_path / "swin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "swin", "hidden_act": "gelu"}))
    proc = cli("distill", "--teacher", folder, "--data", "mnist-5k", "--output", tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("wecolora: error:")]
    assert len(errors) == 1 and "model_type 'swin' is not supported" in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_distill_from_a_transformers_folder_exports_a_timm_student(tmp_path):
    teacher = tmp_path / "dinov2"
    save_transformers_model(teacher, "Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                            {"num_hidden_layers": 4, "num_register_tokens": 1})
    run = tmp_path / "run"
    proc = cli("distill", "--teacher", teacher, "--data", "mnist-5k", "--output", run, "--per-class", "2",
               "--epochs", "1", "--batch-size", "10", "--accum-steps", "1", "--rank", "4", "--num-workers", "0",
               "--device", "cpu", "--no-teacher-cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((run / "adapter" / "wecolora.json").read_text())
    assert info["kept_blocks"] == [0, 2]
    student = timm.create_model(f"local-dir:{run / 'student'}", pretrained=True)
    assert len(student.blocks) == 2 and student.num_reg_tokens == 1 and student.no_embed_class
    with torch.no_grad():
        assert student.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 1 + 1 + 16, 32)
