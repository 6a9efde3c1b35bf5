"""Tests for wecolora.teachers.specs: the path-level checks of a model spec (timm name, folder,
local-dir:, hf-hub:, bundled) and of a weights file, made before any torch import."""
import json

import pytest

from wecolora.errors import UserError
from wecolora.teachers import specs
from wecolora.teachers.specs import check_model_spec, check_weights_file


def _folder(root, *files):
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}) if name.endswith(".json") else "")
    return root


ACCEPTED = [
    "vit_base_patch16_224.mae",  # a timm name: left to timm
    "vit_tiny_patch16_224",
    "hf-hub:timm/vit_base_patch16_224.mae",
    "bundled",
    "bundled-mae",
    "local-dir:{tmp}/timm",
    "{tmp}/timm",
    "{tmp}/run",  # a run folder: its student/config.json
    "{tmp}/pretrain",  # a pretrain output: its model/config.json
]


@pytest.mark.parametrize("spec", ACCEPTED)
def test_accepted_specs(tmp_path, spec):
    _folder(tmp_path / "timm", "config.json", "model.safetensors")
    _folder(tmp_path / "run", "student/config.json")
    _folder(tmp_path / "pretrain", "model/config.json")
    check_model_spec(spec.replace("{tmp}", str(tmp_path)))


REFUSED = [
    # spec, words of the message
    ("", "--teacher is empty"),
    ("local-dir:{tmp}/none", "model folder {tmp}/none does not exist"),
    ("local-dir:{tmp}/empty", "has no config.json"),
    ("{tmp}/empty", "is a folder without config.json"),
    ("{tmp}/weights.pth", "is a file; pass weights with --teacher-weights"),
    ("{tmp}/none", "no such folder"),
    ("./none", "no such folder (timm model names hold no '/')"),
    ("~/surely-no-such-wecolora-folder", "no such folder"),
]


@pytest.mark.parametrize("spec, words", REFUSED)
def test_refused_specs(tmp_path, spec, words):
    _folder(tmp_path / "empty")
    (tmp_path / "weights.pth").write_bytes(b"")
    with pytest.raises(UserError) as error:
        check_model_spec(spec.replace("{tmp}", str(tmp_path)))
    assert words.replace("{tmp}", str(tmp_path)) in str(error.value)
    assert str(error.value).startswith("--teacher")


def test_the_option_is_named():
    with pytest.raises(UserError, match="^--model is empty"):
        check_model_spec("", "--model")


def test_a_bundled_teacher_that_is_not_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(specs.BUNDLED_TEACHERS, "bundled", tmp_path)  # a folder without config.json
    with pytest.raises(UserError, match="the bundled teacher is not in this install .* `wecolora pretrain --data "
                                        "fashion-mnist --output DIR`"):
        check_model_spec("bundled")


@pytest.mark.parametrize("name", ["bundled", "bundled-mae"])
def test_the_bundled_teachers_are_installed(name):
    folder = specs.bundled_teacher(name)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert set(specs.BUNDLED_HOW) == set(specs.BUNDLED_TEACHERS)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth", "w.pt", "w.bin", "w.ckpt", "W.PTH"])
def test_weights_files_accepted(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    check_weights_file(str(tmp_path / name))


def test_no_weights_file_is_fine():
    check_weights_file(None)


@pytest.mark.parametrize("name, words", [
    ("none.pth", "does not exist"),
    ("folder.pth", "is not a file"),
    ("w.npz", "unknown weights format; expected one of .safetensors, .pth, .pt, .bin, .ckpt"),
])
def test_weights_files_refused(tmp_path, name, words):
    (tmp_path / "folder.pth").mkdir()
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(UserError, match="^--teacher-weights .*" + words.replace(".", r"\.")):
        check_weights_file(str(tmp_path / name))
