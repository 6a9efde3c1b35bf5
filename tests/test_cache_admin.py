"""Tests for wecolora.cache.admin and ``wecolora cache list|clear``: entries, sizes, ages, liveness, clearing."""
import json
import os
import subprocess
import sys
import time

import pytest

from wecolora.cache.admin import (
    capped_folders,
    clear_entries,
    evict,
    format_bytes,
    list_entries,
    make_room,
    mark_in_use,
    owner,
    release_in_use,
    remove_stale,
)
from wecolora.cli import main
from wecolora.errors import UserError

DAY = 86400
HOLD_LOCK = ("import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_SH); print('locked', flush=True); "
             "time.sleep(60)")  # a run training with an entry holds this lock on its meta.json


def fake_teacher_entry(root, name, *, views, days_ago, nbytes=1000):
    """A teacher cache entry as teacher_cache writes it: meta.json and view files, last used ``days_ago``."""
    folder = root / "teacher" / name
    folder.mkdir(parents=True)
    meta = {"format": 1, "teacher": "ab" * 16, "images": 40, "teacher_blocks": [5], "precision": "bf16"}
    (folder / "meta.json").write_text(json.dumps(meta))
    for view in range(views):
        (folder / f"view{view:04d}.tokens.npy").write_bytes(b"\0" * nbytes)
        (folder / f"view{view:04d}.images.npy").write_bytes(b"\0" * nbytes)
    stamp = time.time() - days_ago * DAY
    os.utime(folder / "meta.json", (stamp, stamp))
    return folder


def fake_image_store(root, name, *, days_ago, nbytes=1000):
    """An image store as image_store writes it: pixels, sizes and meta.json, last used ``days_ago``."""
    folder = root / "images" / name
    folder.mkdir(parents=True)
    (folder / "pixels.npy").write_bytes(b"\0" * nbytes)
    (folder / "sizes.npy").write_bytes(b"\0" * 16)
    (folder / "meta.json").write_text(json.dumps({"format": 1, "images": 2, "bytes": nbytes}))
    stamp = time.time() - days_ago * DAY
    os.utime(folder / "meta.json", (stamp, stamp))
    return folder


def fake_feature_entry(root, name, *, days_ago):
    """A feature cache entry: a safetensors file whose header metadata is what it is keyed on."""
    header = json.dumps({"__metadata__": {"model": "cd" * 16, "split": "test", "n": "2000", "pooling": "cls"}}).encode()
    path = root / "features" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    stamp = time.time() - days_ago * DAY
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def root(tmp_path):
    fake_teacher_entry(tmp_path, "0123456789abcdef01234567", views=2, days_ago=40)
    fake_teacher_entry(tmp_path, "fedcba9876543210fedcba98", views=1, days_ago=1, nbytes=5000)
    fake_feature_entry(tmp_path, "features1", days_ago=2)
    (tmp_path / "images" / "store1").mkdir(parents=True)  # listed generically: size and age
    (tmp_path / "images" / "store1" / "shard0.bin").write_bytes(b"\0" * 300)
    return tmp_path


def test_entries_are_listed_by_kind_with_size_views_age_and_key(root):
    entries = {e.name: e for e in list_entries(root)}
    old, new = entries["0123456789abcdef01234567"], entries["fedcba9876543210fedcba98"]
    assert (old.kind, old.views, new.views) == ("teacher", 2, 1)
    assert old.bytes == 4000 + (root / "teacher" / old.name / "meta.json").stat().st_size
    assert old.key == {"teacher": "ab" * 6, "images": 40, "precision": "bf16"}
    assert old.last_used < time.time() - 39 * DAY < new.last_used
    features = entries["features1.safetensors"]
    assert features.kind == "features" and features.key == {"teacher": "cd" * 6, "images": "2000", "split": "test",
                                                            "pooling": "cls"}
    assert entries["store1"].kind == "images" and entries["store1"].bytes == 300 and entries["store1"].views is None
    # One cache's own folder (distill --teacher-cache DIR) works too.
    assert {e.name for e in list_entries(root / "teacher")} == {old.name, new.name}


def test_cache_list_prints_every_entry_with_its_size(root, capsys):
    assert main(["cache", "list", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    old = next(line for line in lines if line.startswith("teacher/0123456789abcdef"))
    new = next(line for line in lines if line.startswith("teacher/fedcba98"))
    assert "2 views" in old and "last used 40 d ago" in old and "teacher=abababababab" in old and "kB" in old
    assert "1 view," not in new and "  1 view  " in new and "10.1 kB" in new
    assert any(line.startswith("features/features1.safetensors") for line in lines)
    assert any(line.startswith("images/store1  300 B") for line in lines)
    assert lines[-1].startswith("4 entries, ")

    assert main(["cache", "list", "--cache-dir", str(root), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["root"] == str(root) and len(listing["entries"]) == 4
    assert listing["total_bytes"] == sum(e["bytes"] for e in listing["entries"])
    assert {"kind", "name", "bytes", "views", "last_used", "last_used_iso", "key", "busy"} <= set(listing["entries"][0])


def test_cache_clear_older_than_deletes_only_the_old_entries_and_says_what_it_freed(root, capsys):
    old_size = next(e.bytes for e in list_entries(root) if e.name.startswith("0123"))
    assert main(["cache", "clear", "--older-than", "30", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "removed teacher/0123456789abcdef01234567" in out
    assert f"freed {format_bytes(old_size)} (1 entry)" in out
    assert not (root / "teacher" / "0123456789abcdef01234567").exists()
    assert (root / "teacher" / "fedcba9876543210fedcba98").is_dir() and (root / "features" / "features1.safetensors").is_file()
    assert not [p for p in (root / "teacher").iterdir() if p.name.startswith(".")]  # nothing parked left

    assert main(["cache", "clear", "--all", "--cache-dir", str(root)]) == 0
    assert "(3 entries)" in capsys.readouterr().out and list_entries(root) == []


def test_cache_clear_keeps_an_entry_a_running_process_uses(root, capsys):
    busy = root / "teacher" / "0123456789abcdef01234567"
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(busy / "meta.json")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline() == "locked\n"
        assert [e.busy for e in list_entries(root) if e.name == busy.name] == [True]
        assert main(["cache", "clear", "--all", "--cache-dir", str(root)]) == 0
        out = capsys.readouterr().out
        assert busy.is_dir() and "kept teacher/0123456789abcdef01234567" in out and "(3 entries)" in out
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("argv, fragment", [
    (["cache", "list", "--cache-dir", "{root}/nope"], "--cache-dir {root}/nope does not exist"),
    (["cache", "clear", "--all", "--cache-dir", "{root}/nope"], "--cache-dir {root}/nope does not exist"),
    (["cache", "clear", "--cache-dir", "{root}"], "give --all or --older-than DAYS"),
    (["cache", "clear", "--all", "--older-than", "3", "--cache-dir", "{root}"], "give --all or --older-than DAYS"),
    (["cache", "clear", "--older-than", "-1", "--cache-dir", "{root}"], "--older-than -1.0 is invalid"),
])
def test_bad_cache_commands_fail_in_one_line(root, capsys, argv, fragment):
    before = sorted(str(p) for p in root.rglob("*"))
    assert main([a.format(root=root) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wecolora: error: ") and fragment.format(root=root) in err
    assert sorted(str(p) for p in root.rglob("*")) == before


def test_an_unknown_cache_action_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "purge"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'purge'" in err


def test_cache_list_needs_no_torch(tmp_path):
    code = ("import sys; from wecolora.cli import main; "
            f"assert main(['cache', 'list', '--cache-dir', {str(tmp_path)!r}]) == 0; "
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "0 entries, 0 B in" in proc.stdout


def test_a_live_writer_keeps_its_entry_and_a_dead_one_does_not(root):
    entry = root / "teacher" / "0123456789abcdef01234567"
    other = subprocess.Popen(["sleep", "60"])
    temp = entry / f".view0002.tokens.{owner().rpartition('-')[0]}-{other.pid}.x1.tmp"
    temp.write_bytes(b"x")
    try:
        assert not evict(entry) and entry.is_dir()
    finally:
        other.kill()
        other.wait()
    remove_stale(entry)
    assert not temp.exists() and evict(entry) and not entry.exists()


def test_an_empty_default_root_lists_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WECOLORA_CACHE_DIR", str(tmp_path / "never-made"))
    assert main(["cache", "list"]) == 0
    assert capsys.readouterr().out.startswith("0 entries, 0 B in")
    with pytest.raises(UserError, match="give --all"):
        clear_entries()


def test_make_room_evicts_the_least_recently_used_teacher_entry_or_image_store_not_in_use(tmp_path):
    in_use = fake_teacher_entry(tmp_path, "in-use", views=1, days_ago=5)
    store = fake_image_store(tmp_path, "store", days_ago=3)
    recent = fake_teacher_entry(tmp_path, "recent", views=1, days_ago=1)
    capped = capped_folders(tmp_path / "teacher", tmp_path / "images")
    total = sum(e.bytes for e in list_entries(tmp_path))
    mark_in_use(in_use)  # this process trains with it
    try:
        assert not make_room(capped, total + 1, total)  # over the cap by itself: nothing evicted
        assert store.is_dir() and recent.is_dir()
        assert make_room(capped, 1, total)
        assert not store.exists() and in_use.is_dir() and recent.is_dir()
        total = sum(e.bytes for e in list_entries(tmp_path))
        assert not make_room(capped, 1, total, keep=recent)  # the rest is in use or kept
        assert in_use.is_dir() and recent.is_dir()
    finally:
        release_in_use()
