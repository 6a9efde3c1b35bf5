"""Tests for wecolora.api (and the names ``wecolora`` re-exports): each function's checks of what it was given,
the results of the light functions, and that a wrong path fails before torch is imported."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wecolora
from wecolora import api
from wecolora.errors import UserError

from conftest import tiny_vit


@pytest.mark.parametrize("args, expected", [
    ((12, 3, "first"), [0, 3, 6, 9]),
    ((12, 3, "last"), [2, 5, 8, 11]),
    ((12, 3), [0, 3, 6, 9]),
    ((6, 2, "0,5"), [0, 5]),
])
def test_select_blocks(args, expected):
    assert wecolora.select_blocks(*args) == expected


def _block_params(width: int, mlp: int) -> int:
    """One timm ViT block: two LayerNorms, qkv, proj, fc1, fc2 (with biases)."""
    return 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width) + (width * mlp + mlp) \
        + (mlp * width + width)


# The bundled teacher: 12 blocks of width 128 (MLP 512), 28 px images in 7 px patches (17 tokens), 10 classes.
BUNDLED_BLOCK = _block_params(128, 512)
BUNDLED_REST = (3 * 7 * 7 * 128 + 128) + 128 + 17 * 128 + 2 * 128 + (128 * 10 + 10)  # stem, cls, pos, norm, head


def _lora_params(rank: int, width: int = 128, mlp: int = 512) -> int:
    """Adapters on q, k, v, proj (width -> width), fc1 (width -> mlp) and fc2 (mlp -> width) of one block."""
    return 4 * rank * (width + width) + rank * (width + mlp) + rank * (mlp + width)


@pytest.mark.parametrize("reduction, keep, mode, kept, trainable", [
    (2, "first", "wecolora", [0, 2, 4, 6, 8, 10], 6 * _lora_params(32)),  # rank 32: width 128 / 4
    (3, "last", "weco-kd", [2, 5, 8, 11], None),  # every weight of the student trains
    (4, "first", "lora-qv", [0, 4, 8], 3 * 2 * 32 * (128 + 128)),
])
def test_inspect_the_bundled_teacher(reduction, keep, mode, kept, trainable):
    info = wecolora.inspect("bundled", reduction, keep, mode)
    merged = BUNDLED_REST + len(kept) * BUNDLED_BLOCK
    assert (info["teacher_blocks"], info["width"], info["kept_blocks"]) == (12, 128, kept)
    assert info["teacher_params"] == BUNDLED_REST + 12 * BUNDLED_BLOCK
    assert info["merged_params"] == merged
    assert info["trainable_params"] == (merged if trainable is None else trainable)
    assert info["student_params"] == (merged if trainable is None else merged + trainable)
    assert info["rank"] == (None if trainable is None else 32)


def test_inspect_with_a_rank_and_an_input_size():
    info = wecolora.inspect("bundled", 2, rank=8, img_size=56)
    assert info["rank"] == 8 and info["trainable_params"] == 6 * _lora_params(8)
    assert info["teacher_params"] == BUNDLED_REST + 12 * BUNDLED_BLOCK + (65 - 17) * 128  # 8 x 8 patches + cls


@pytest.mark.parametrize("call, words", [
    (lambda tmp: wecolora.distill(teacher="bundled", data="/nonexistent", output=str(tmp / "run")),
     "neither an existing folder"),
    (lambda tmp: wecolora.distill(teacher="./no/such", data="fashion-mnist", output=str(tmp / "run")),
     "no such folder"),
    (lambda tmp: wecolora.distill(teacher="bundled", data="fashion-mnist", output=str(tmp / "f.txt")),
     "exists and is not a folder"),
    (lambda tmp: wecolora.distill(teacher="bundled", data="fashion-mnist", output=str(tmp / "run"), epochs=0),
     "--epochs 0 is invalid"),
    (lambda tmp: wecolora.distill(teacher="bundled", data="fashion-mnist", output=str(tmp / "run"), speed=2),
     "unknown setting(s) speed"),
    (lambda tmp: wecolora.distill(teacher="bundled", data="fashion-mnist"), "missing required setting(s): --output"),
    (lambda tmp: wecolora.pretrain(data=str(tmp / "none"), output=str(tmp / "t")), "neither an existing folder"),
    (lambda tmp: wecolora.probe("local-dir:/nonexistent", "mnist-5k", str(tmp / "p")), "does not exist"),
    (lambda tmp: wecolora.probe("bundled", str(tmp / "f.txt"), str(tmp / "p")), "is a file"),
    (lambda tmp: wecolora.knn("bundled", "mnist-5k", str(tmp / "k"), k=0), "--k 0 is invalid"),
    (lambda tmp: wecolora.knn(str(tmp), "mnist-5k", str(tmp / "k")), "folder without config.json"),
    (lambda tmp: wecolora.report([], str(tmp / "r")), "at least one run folder"),
    (lambda tmp: wecolora.report([str(tmp / "none")], str(tmp / "r")), "does not exist"),
    (lambda tmp: wecolora.load_model("./no/such"), "no such folder"),
    (lambda tmp: wecolora.load_model(""), "--model is empty"),
    (lambda tmp: wecolora.inspect("local-dir:/nonexistent"), "does not exist"),
    (lambda tmp: wecolora.inspect("bundled", 12), "reduction 12 is impossible"),
    (lambda tmp: wecolora.load_ablation(), "give exactly one of --preset"),
    (lambda tmp: wecolora.load_ablation("no-such-preset"), "unknown preset"),
    (lambda tmp: wecolora.cache_entries(str(tmp / "none")), "--cache-dir"),
    (lambda tmp: wecolora.clear_cache(str(tmp)), "give --all or --older-than"),
])
def test_bad_input_is_a_user_error(tmp_path, call, words):
    (tmp_path / "f.txt").write_text("a file")
    with pytest.raises(UserError) as error:
        call(tmp_path)
    assert words in str(error.value)


def test_ablate_checks_the_grid_s_paths_first(tmp_path):
    grid = wecolora.load_ablation("demo", quick=True, distill_data=str(tmp_path / "none"))
    with pytest.raises(UserError, match="neither an existing folder"):
        wecolora.ablate(grid, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_wrong_path_fails_without_importing_torch(tmp_path):
    src = Path(wecolora.__file__).parents[1]
    script = ("import sys, wecolora\n"
              "try:\n"
              f"    wecolora.distill(teacher='bundled', data={str(tmp_path / 'none')!r}, output={str(tmp_path / 'r')!r})\n"
              "except wecolora.UserError as err:\n"
              "    print('UserError', 'torch' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "UserError False"


def test_cache_entries_of_an_empty_cache(tmp_path):
    assert wecolora.cache_entries(str(tmp_path)) == []
    assert wecolora.clear_cache(str(tmp_path), everything=True) == ([], [])


def test_build_plan_and_merge_a_student():
    teacher = tiny_vit(depth=6)
    plan = wecolora.plan_student(teacher, 3, "last", rank=4)
    assert list(plan.kept) == [2, 5] and plan.rank == 4
    student = wecolora.build_student(teacher, 3, "last", rank=4)
    merged = wecolora.merge(student)
    assert isinstance(merged, type(teacher)) and len(merged.blocks) == 2
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(images), student(images), atol=1e-5, rtol=1e-5)


def test_the_package_exports():
    for name in wecolora.__all__:
        assert getattr(wecolora, name) is not None, name
    from wecolora.method.plan import MODES

    assert wecolora.MODES is MODES
    assert wecolora.UserError is UserError
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wecolora.nope  # noqa: B018
    assert api.select_blocks is wecolora.select_blocks
