"""Tests for the ONNX export of a merged student (``wecolora export RUN --onnx``)."""
import builtins

import numpy as np
import pytest
import torch

import wecolora
from wecolora.cli import main
from wecolora.errors import UserError
from wecolora.export import export_onnx, save_student
from wecolora.method.student import build_student

from conftest import tiny_vit

onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding a merged student whose adapters did something (B != 0)."""
    teacher = tiny_vit(img_size=28, patch_size=7)
    student = build_student(teacher, 2, mode="wecolora", rank=4)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("run")
    save_student(wecolora.merge(student).eval(), folder / "student")
    return folder


def test_onnx_output_matches_torch_within_1e_4(run):
    result = export_onnx(run)
    path = run / "student.onnx"
    assert result["path"] == str(path) and path.is_file() and result["max_abs_diff"] <= 1e-4
    assert not list(run.glob(".student.onnx*"))  # no temporary left behind
    model = wecolora.teachers.load.load_model(str(run)).eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        images = torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = model(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        assert got.shape == expected.shape == (batch, 10)
        assert np.abs(got - expected).max() <= 1e-4


def test_cli_export_and_its_errors(run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "--onnx", "--output", str(out)]) == 0
    assert out.is_file() and "onnxruntime matches torch" in capsys.readouterr().out
    assert main(["export", str(run), "--onnx", "--output", str(tmp_path / "m.txt")]) == 2
    assert "must end with .onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--onnx"]) == 2
    assert "wecolora: error:" in capsys.readouterr().err


def test_a_missing_extra_names_it(run, monkeypatch):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(UserError, match=r"wecolora\[onnx\]"):
        export_onnx(run)


def test_a_narrow_student_exports_exactly(tmp_path):
    """A student with fewer channels, heads and MLP neurons than its teacher exports like any timm ViT."""
    teacher = tiny_vit(img_size=28, patch_size=7)
    student = build_student(teacher, 3, mode="wecolora", rank=4, embed_dim=16, mlp_hidden=40, width_ranking="uniform")
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    save_student(wecolora.merge(student).eval(), tmp_path / "student")
    result = export_onnx(tmp_path)
    assert result["max_abs_diff"] <= 1e-5
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = student(images).numpy()  # the adapter student itself, not its merge
    assert np.abs(session.run(None, {"images": images.numpy()})[0] - expected).max() <= 1e-5
