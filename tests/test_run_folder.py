"""Tests for wecolora.train.run_folder: the pure path-level checks of a run before it starts (a finished or
interrupted run is not clobbered without --overwrite/--resume, a resume keeps the settings that decide what is
computed; made without torch), and the claim that locks, repairs and releases a run folder."""
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# The claim

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from wecolora.train.run_folder import LOCK_FILE, RunFolder

FINISHED = "adapter/wecolora.json"


def claim(output, **overrides):
    settings = dict(finished=FINISHED, overwrite=False, resume=None)
    settings.update(overrides)
    return RunFolder.claim(output, **settings)


def finished_run(folder):
    (folder / "adapter").mkdir(parents=True)
    (folder / FINISHED).write_text("{}")
    (folder / "config.yaml").write_text("settings: {}\n")
    return folder


def interrupted_run(folder):
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "config.yaml").write_text("settings: {}\n")
    return folder


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- the pure checks


def test_a_finished_run_is_refused_without_overwrite(tmp_path):
    run = finished_run(tmp_path / "run")
    with pytest.raises(UserError, match="already holds a finished run; pass --overwrite"):
        check_run_folder(run, finished=FINISHED, overwrite=False, resume=None)
    assert check_run_folder(run, finished=FINISHED, overwrite=True, resume=None) == run


def test_an_interrupted_run_needs_resume_auto_or_overwrite(tmp_path):
    run = interrupted_run(tmp_path / "run")
    with pytest.raises(UserError, match="holds an interrupted run; pass --resume auto"):
        check_run_folder(run, finished=FINISHED, overwrite=False, resume=None)
    for overwrite, resume in ((False, "auto"), (True, None), (True, "auto")):
        check_run_folder(run, finished=FINISHED, overwrite=overwrite, resume=resume)


def test_the_check_only_reads_and_judges_a_parked_folder_as_the_repair_will_leave_it(tmp_path):
    run = tmp_path / "run"
    (run / ".adapter.old").mkdir(parents=True)  # a kill between the two renames of a folder swap
    (run / ".adapter.old" / "wecolora.json").write_text("{}")
    (run / ".student.old").mkdir()
    (run / ".student.old" / "model.safetensors").write_text("weights")
    (run / ".checkpoint.old").mkdir()
    (run / ".config.yaml.abcdefgh.tmp").write_text("half")
    before = listing(run)
    with pytest.raises(UserError, match="holds a finished run and an interrupted --overwrite of it"):
        check_run_folder(run, finished=FINISHED, overwrite=False, resume=None)
    check_run_folder(run, finished=FINISHED, overwrite=True, resume="auto")
    assert listing(run) == before  # nothing repaired, nothing cleaned: that is the claim's work
    with claim(run, overwrite=True, resume="auto") as folder:
        assert (run / "student" / "model.safetensors").is_file() and not (run / ".student.old").exists()
        assert (run / FINISHED).is_file() and folder.resume_from == run / "checkpoint"
        assert not (run / ".config.yaml.abcdefgh.tmp").exists()  # the run goes ahead: temporaries dropped
        assert (run / LOCK_FILE).is_file()
    assert not (run / LOCK_FILE).exists()


def test_a_refused_claim_still_puts_parked_folders_back_but_keeps_temporaries(tmp_path):
    run = finished_run(tmp_path / "run")
    os.rename(run / "adapter", run / ".adapter.old")
    (run / ".summary.csv.abcdefgh.tmp").write_text("half")
    with pytest.raises(UserError, match="already holds a finished run"), claim(run):
        pass
    assert (run / FINISHED).is_file() and (run / ".summary.csv.abcdefgh.tmp").is_file()
    assert not (run / LOCK_FILE).exists()


def test_resume_from(tmp_path):
    run = interrupted_run(tmp_path / "run")
    with claim(run, resume="auto") as folder:
        assert folder.resume_from == run / "checkpoint" and folder.checkpoint == run / "checkpoint"
    with claim(tmp_path / "fresh", resume="auto") as folder:
        assert folder.resume_from is None  # auto without a checkpoint: a fresh start
    other = interrupted_run(tmp_path / "other")
    for name in ("trainable.safetensors", "optimizer.pt", "state.json"):
        (other / "checkpoint" / name).write_text("x")
    with claim(tmp_path / "third", resume=str(other / "checkpoint")) as folder:
        assert folder.resume_from == other / "checkpoint"


def test_a_fresh_start_drops_the_checkpoint_of_the_run_it_overwrites_when_it_writes_its_config(tmp_path):
    run = interrupted_run(tmp_path / "run")
    with claim(run, overwrite=True) as folder:
        assert (run / "checkpoint").is_dir()  # a run that fails before writing changes nothing
        folder.write_config("settings: {new: 1}\n")
        assert not (run / "checkpoint").exists() and "new" in (run / "config.yaml").read_text()
        folder.write_summary([{"epoch": 1, "loss": 0.5}], ("epoch", "loss"))
        assert (run / "summary.csv").read_bytes() == b"epoch,loss\r\n1,0.5\r\n"
    run = interrupted_run(tmp_path / "resumed")
    with claim(run, resume="auto") as folder:
        folder.write_config("settings: {}\n")
        assert (run / "checkpoint").is_dir()
        folder.finish()
        assert not (run / "checkpoint").exists()


# ---------------------------------------------------------------- made folders


def test_a_run_that_fails_before_writing_leaves_no_folder_behind(tmp_path):
    output = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(RuntimeError), claim(output):
        assert output.is_dir() and (output / LOCK_FILE).is_file()
        raise RuntimeError("the subset is too small")
    assert not (tmp_path / "new").exists()  # every folder the claim made is gone again
    with pytest.raises(RuntimeError), claim(output) as folder:
        folder.write_config("settings: {}\n")
        raise RuntimeError("later")
    assert listing(tmp_path / "new") == ["deeper", "deeper/run", "deeper/run/config.yaml"]


def test_a_failure_keeps_a_folder_the_claim_did_not_make(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RuntimeError), claim(run):
        raise RuntimeError
    assert run.is_dir() and listing(run) == []


# ---------------------------------------------------------------- the lock


def test_a_second_claim_of_a_held_folder_is_refused_with_one_line_naming_it(tmp_path):
    run = tmp_path / "run"
    with claim(run):
        # Another open() of the lock file: flock locks of two open file descriptions conflict, even in one process.
        with pytest.raises(UserError) as err, claim(run):
            pass
        message = str(err.value)
        assert message == (f"{run} is in use by another wecolora run (pid {os.getpid()} on {socket.gethostname()}); "
                           f"wait for it to finish or choose another --output")
        assert "\n" not in message
        assert (run / LOCK_FILE).is_file()  # the refused claim left the holder's lock alone
    assert listing(run) == []  # released: the lock file goes with the lock
    with claim(run):  # and the folder can be claimed again
        pass


def test_a_claim_refused_as_in_use_leaves_the_holders_folder(tmp_path):
    run = tmp_path / "run"
    with claim(run) as folder:
        folder.write_config("settings: {}\n")
        with pytest.raises(UserError, match="is in use by another wecolora run"), claim(run, overwrite=True):
            pass
        assert listing(run) == [LOCK_FILE, "config.yaml"]


def test_only_the_first_process_locks_and_repairs(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".student.old").mkdir()
    with claim(run):
        monkeypatch.setenv("RANK", "1")  # another torchrun process of the same run
        with claim(run):
            pass
        monkeypatch.setenv("RANK", "0")
        assert (run / LOCK_FILE).is_file()  # the first process still holds it
    assert (run / "student").is_dir()  # repaired once, by the first process


HOLDER = textwrap.dedent("""
    import sys, time
    from wecolora.train.run_folder import RunFolder
    with RunFolder.claim(sys.argv[1], finished="adapter/wecolora.json", overwrite=False, resume=None):
        print("held", flush=True)
        sys.stdin.readline()  # until told to go (or killed)
""")


def test_a_folder_held_by_another_process_is_refused_until_it_ends_and_a_dead_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"{run} is in use by another wecolora run \\(pid {holder.pid} on "):
            with claim(run):
                pass
        holder.send_signal(signal.SIGKILL)  # killed while holding it: the lock goes with the process
        assert holder.wait(timeout=30) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid} on" in (run / LOCK_FILE).read_text()  # the dead run's lock file is still there...
    with claim(run):  # ...but blocks nothing
        assert f"pid {os.getpid()} on" in (run / LOCK_FILE).read_text()
    assert not (run / LOCK_FILE).exists()


def test_a_second_distill_into_a_held_folder_is_refused_before_it_writes(teacher_dir, tmp_path):
    from wecolora import api

    run = tmp_path / "run"
    settings = dict(teacher=f"local-dir:{teacher_dir}", data="mnist-5k", output=str(run), ratio=0.02, epochs=1,
                    warmup_epochs=0, batch_size=16, num_workers=0, device="cpu")
    with claim(run):  # the first run, still going
        with pytest.raises(UserError, match=f"^{run} is in use by another wecolora run .*choose another --output$"):
            api.distill(**settings)
        with pytest.raises(UserError, match="is in use by another wecolora run"):
            api.pretrain(data="mnist-5k", output=str(run), epochs=1, device="cpu")
        assert listing(run) == [LOCK_FILE]


@pytest.mark.parametrize("resume, has_checkpoint, expected", [
    (None, True, None), ("", True, None), ("auto", True, "checkpoint"), ("auto", False, None),
    ("elsewhere/ckpt", False, "elsewhere/ckpt")])
def test_resume_from_names_the_checkpoint(tmp_path, resume, has_checkpoint, expected):
    if has_checkpoint:
        (tmp_path / "checkpoint").mkdir()
    folder = RunFolder(tmp_path, resume)
    want = None if expected is None else tmp_path / "checkpoint" if expected == "checkpoint" else Path(expected)
    assert folder.resume_from == want
