"""The run folder: pure checks of what it holds, and the claim that locks, repairs and releases it."""
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from wecolora.errors import UserError
from wecolora.train.run_folder import LOCK_FILE, RunFolder, check_run_folder

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
