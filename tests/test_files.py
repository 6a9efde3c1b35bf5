"""Atomic writes: a SIGKILL at any point, a full disk or a failed writer leave the old artifact or the new one."""
import errno
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from wecolora.files import _umask, atomic_dir, atomic_write_text, disk_error, recover, recover_folder

# A child process writes a new version over an old one and SIGKILLs itself at the named point.
KILL_CHILD = textwrap.dedent("""
    import os, signal, sys
    from wecolora import files
    target, kind, point = sys.argv[1:4]

    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    def after(fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            die()
            return result
        return wrapped

    if point == "fsync":  # data written, not yet durable or renamed
        os.fsync = die
    elif point == "rename":  # before the temporary takes the final name
        os.replace = die
        files._exchange = die
    elif point == "after-rename":  # the new version is in place; clean-up not done
        os.replace = after(os.replace)
        files._exchange = after(files._exchange)
    elif point == "parked":  # no RENAME_EXCHANGE: the old folder parked, the new one not yet in place
        files._exchange = lambda a, b: False
        real_replace = os.replace
        os.replace = lambda a, b: (real_replace(a, b), str(b).endswith(".old") and die())
    if kind == "file":
        files.atomic_write_text(target, "new " * 50_000)
    else:
        with files.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new a")
            if point == "writing":
                (tmp / "b.txt").write_text("new b"[:3])
                die()
            (tmp / "b.txt").write_text("new b")
""")

DIR_POINTS = ["writing", "fsync", "rename", "after-rename", "parked"]


def read_dir(path):
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("point", ["fsync", "rename", "after-rename"])
def test_a_kill_during_a_file_write_leaves_the_old_file_or_the_new_one(tmp_path, point):
    target = tmp_path / "summary.csv"
    target.write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILL_CHILD, str(target), "file", point])
    assert proc.returncode == -9
    assert target.read_text() in ("old", "new " * 50_000)
    assert target.read_text() == ("new " * 50_000 if point == "after-rename" else "old")


@pytest.mark.parametrize("point", DIR_POINTS)
def test_a_kill_during_a_folder_swap_leaves_the_old_folder_or_the_new_one(tmp_path, point):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "a.txt").write_text("old a")
    (target / "b.txt").write_text("old b")
    proc = subprocess.run([sys.executable, "-c", KILL_CHILD, str(target), "dir", point])
    assert proc.returncode == -9
    recover(target)  # what the next run does before reading or writing it
    expected = {"a.txt": "new a", "b.txt": "new b"} if point == "after-rename" else {"a.txt": "old a", "b.txt": "old b"}
    assert read_dir(target) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no stale temporaries left


def test_recover_puts_a_parked_folder_back_and_drops_a_stale_one(tmp_path):
    parked = tmp_path / ".student.old"
    parked.mkdir()
    (parked / "model.safetensors").write_text("weights")
    recover(tmp_path / "student")
    assert read_dir(tmp_path / "student") == {"model.safetensors": "weights"}
    parked.mkdir()
    recover(tmp_path / "student")  # the new folder is complete: the parked copy is the stale one
    assert not parked.exists()


def test_recover_folder_restores_parked_folders_first_and_cleans_temporaries_only_when_asked(tmp_path):
    (tmp_path / ".checkpoint.old").mkdir()
    (tmp_path / ".checkpoint.old" / "state.json").write_text("{}")
    (tmp_path / ".checkpoint.abcd1234.tmp").mkdir()
    (tmp_path / ".summary.csv.abcd1234.tmp").write_text("half")
    (tmp_path / ".keep.me").write_text("not ours")
    recover_folder(tmp_path, clean=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".checkpoint.abcd1234.tmp", ".keep.me", ".summary.csv.abcd1234.tmp", "checkpoint"]
    recover_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.me", "checkpoint"]


def test_a_failing_writer_leaves_the_previous_folder_and_no_temporaries(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "wecolora.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "wecolora.json").write_text('{"half')
        raise RuntimeError("writer failed")
    assert read_dir(target) == {"wecolora.json": "{}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        _umask.cache_clear()
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        with atomic_dir(tmp_path / "student") as tmp:
            (tmp / "config.json").write_text("{}")
            os.chmod(tmp / "config.json", 0o600)  # as safetensors writes its files
    finally:
        os.umask(old)
        _umask.cache_clear()
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "student").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "student" / "config.json").stat().st_mode) == 0o644


DISK_FULL_CHILD = textwrap.dedent("""
    import resource, signal, sys
    from wecolora.files import atomic_write_text, disk_error
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        atomic_write_text(sys.argv[1], "x" * 100_000)
    except OSError as err:
        print(disk_error(err))
""")


def test_a_full_disk_keeps_the_previous_file_and_says_why(tmp_path):
    target = tmp_path / "summary.csv"
    target.write_text("epoch,loss\n1,0.5\n")
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_CHILD, str(target)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cannot write") and "File too large" in proc.stdout
    assert target.read_text() == "epoch,loss\n1,0.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


@pytest.mark.parametrize("err, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/a/summary.csv"),
     "cannot write /runs/a/summary.csv: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs"), "cannot access /runs: Permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "cannot write: Read-only file system"),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
     "cannot write: No space left on device"),
    (RuntimeError("wrapped"), None),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "x"), None),
])
def test_disk_errors_are_recognised_and_others_are_not(err, expected):
    assert disk_error(err) == expected


def test_a_disk_error_is_found_behind_a_wrapping_exception():
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "f")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert disk_error(outer) == "cannot write f: Disk quota exceeded"
