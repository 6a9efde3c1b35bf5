"""Tests for wecolora.train.run_folder: the path-level checks of a run before it starts (a finished or
interrupted run is not clobbered without --overwrite/--resume, a resume keeps the settings that decide
what is computed), made without torch."""
import pytest

from wecolora.config import DistillConfig, PretrainConfig, to_yaml
from wecolora.errors import UserError
from wecolora.train.run_folder import (
    CHECKPOINT_FILES,
    RESUME_MAY_CHANGE,
    changed_settings,
    check_distill,
    check_pretrain,
    check_run_folder,
    check_same_settings,
)

FINISHED = "adapter/wecolora.json"


def _make(out, *, finished=False, interrupted=False):
    out.mkdir(parents=True, exist_ok=True)
    if finished:
        (out / FINISHED).parent.mkdir(parents=True, exist_ok=True)
        (out / FINISHED).write_text("{}")
    if interrupted:
        (out / "checkpoint").mkdir()
    return out


def _checkpoint(folder, files=CHECKPOINT_FILES):
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"")
    return str(folder)


ACCEPTED = [
    # state of the folder, overwrite, resume
    (dict(), False, None),
    (dict(), False, "auto"),  # auto on a fresh folder starts afresh
    (dict(finished=True), True, None),
    (dict(interrupted=True), False, "auto"),
    (dict(interrupted=True), True, None),
    (dict(finished=True, interrupted=True), True, "auto"),
    (dict(finished=True, interrupted=True), True, None),
]


@pytest.mark.parametrize("state, overwrite, resume", ACCEPTED)
def test_accepted(tmp_path, state, overwrite, resume):
    out = _make(tmp_path / "run", **state)
    assert check_run_folder(str(out), finished=FINISHED, overwrite=overwrite, resume=resume) == out


def test_a_folder_that_does_not_exist_yet_is_not_made(tmp_path):
    out = check_run_folder(str(tmp_path / "a" / "b"), finished=FINISHED, overwrite=False, resume=None)
    assert out == tmp_path / "a" / "b" and not out.exists()


REFUSED = [
    (dict(finished=True), False, None, "already holds a finished run; pass --overwrite"),
    (dict(finished=True), False, "auto", "already holds a finished run"),
    (dict(interrupted=True), False, None, "holds an interrupted run; pass --resume auto"),
    (dict(finished=True, interrupted=True), False, "auto", "a finished run and an interrupted --overwrite"),
]


@pytest.mark.parametrize("state, overwrite, resume, words", REFUSED)
def test_refused(tmp_path, state, overwrite, resume, words):
    out = _make(tmp_path / "run", **state)
    with pytest.raises(UserError, match=words):
        check_run_folder(str(out), finished=FINISHED, overwrite=overwrite, resume=resume)
    assert (out / "checkpoint").is_dir() == state.get("interrupted", False)  # nothing was removed


def test_resume_from_a_checkpoint_folder(tmp_path):
    complete = _checkpoint(tmp_path / "ckpt")
    check_run_folder(str(tmp_path / "run"), finished=FINISHED, overwrite=False, resume=complete)
    with pytest.raises(UserError, match="is not a checkpoint folder"):
        check_run_folder(str(tmp_path / "run"), finished=FINISHED, overwrite=False, resume=str(tmp_path / "none"))
    partial = _checkpoint(tmp_path / "partial", CHECKPOINT_FILES[:1])
    with pytest.raises(UserError, match="optimizer.pt, state.json missing"):
        check_run_folder(str(tmp_path / "run"), finished=FINISHED, overwrite=False, resume=partial)


def test_an_output_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="--output .* exists and is not a folder"):
        check_run_folder(str(tmp_path / "f"), finished=FINISHED, overwrite=False, resume=None)


def _config(tmp_path, **overrides):
    return DistillConfig(**{"teacher": "bundled", "data": "mnist-5k", "output": str(tmp_path / "run"), **overrides})


@pytest.mark.parametrize("overrides, changed", [
    (dict(), ""),
    (dict(batch_size=64, accum_steps=2, device="cpu", num_workers=0, teacher_cache="on"), ""),  # how, not what
    (dict(ratio=0.02), "--ratio 0.01 -> 0.02"),
    (dict(mode="weco-kd", seed=3), "--mode 'wecolora' -> 'weco-kd', --seed 0 -> 3"),
    (dict(keep="last"), "--keep 'first' -> 'last'"),
])
def test_changed_settings(tmp_path, overrides, changed):
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(_config(tmp_path), lr=1e-3))
    assert changed_settings(_config(tmp_path, **overrides), saved) == changed


def test_one_folder_given_two_ways_is_the_same_setting(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(_config(tmp_path, data=str(tmp_path / "data"))))
    monkeypatch.chdir(tmp_path)
    assert changed_settings(_config(tmp_path, data="data"), saved) == ""
    assert changed_settings(_config(tmp_path, data="./data/../data"), saved) == ""


def test_changed_settings_without_a_saved_config_is_empty(tmp_path):
    assert changed_settings(_config(tmp_path, ratio=0.5), tmp_path / "none.yaml") == ""


def test_changed_settings_can_ignore_other_settings(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(_config(tmp_path)))
    assert changed_settings(_config(tmp_path, batch_size=8), saved, ignore=set()) == "--batch-size 128 -> 8"


def test_a_resume_with_other_settings_is_refused(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(_config(tmp_path)))
    with pytest.raises(UserError, match=r"cannot resume .* \(--epochs 10 -> 20\)"):
        check_same_settings(_config(tmp_path, epochs=20), saved)
    check_same_settings(_config(tmp_path, precision="bf16"), saved)


def test_the_settings_a_resume_may_change_are_settings():
    import dataclasses

    assert RESUME_MAY_CHANGE <= {f.name for f in dataclasses.fields(DistillConfig)}


def test_check_distill(tmp_path, teacher_dir):
    config = _config(tmp_path, teacher=f"local-dir:{teacher_dir}")
    assert check_distill(config) == tmp_path / "run"
    _make(tmp_path / "run", interrupted=True)
    (tmp_path / "run" / "config.yaml").write_text(to_yaml(config))
    check_distill(_config(tmp_path, teacher=f"local-dir:{teacher_dir}", resume="auto"))
    with pytest.raises(UserError, match=r"cannot resume .* \(--ratio 0.01 -> 0.5\)"):
        check_distill(_config(tmp_path, teacher=f"local-dir:{teacher_dir}", resume="auto", ratio=0.5))


@pytest.mark.parametrize("overrides, words", [
    (dict(teacher="local-dir:/nonexistent"), "does not exist"),
    (dict(teacher_weights="/nonexistent.pth"), "--teacher-weights /nonexistent.pth does not exist"),
    (dict(data="/nonexistent"), "neither an existing folder"),
])
def test_check_distill_refuses(tmp_path, overrides, words):
    with pytest.raises(UserError, match=words):
        check_distill(_config(tmp_path, **overrides))


def test_check_distill_reads_the_cache_cap_only_with_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WECOLORA_CACHE_MAX_GB", "lots")
    check_distill(_config(tmp_path))  # no teacher cache: the cap does not matter
    with pytest.raises(UserError, match="WECOLORA_CACHE_MAX_GB='lots' is invalid"):
        check_distill(_config(tmp_path, teacher_cache="on"))


def test_check_pretrain(tmp_path):
    config = PretrainConfig(data="mnist-5k", output=str(tmp_path / "t"))
    assert check_pretrain(config) == tmp_path / "t"
    (tmp_path / "t" / "model").mkdir(parents=True)
    (tmp_path / "t" / "model" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a finished run"):
        check_pretrain(config)
    with pytest.raises(UserError, match="neither an existing folder"):
        check_pretrain(PretrainConfig(data=str(tmp_path / "none"), output=str(tmp_path / "u")))
