"""Tests for wecolora.cache.teacher: cache keys, atomic views, and distillation with the cache."""
import dataclasses
import os
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import wecolora.cache.teacher as teacher_cache
import wecolora.train.distill as distill_module
import wecolora.train.setup as training_setup
from wecolora.cache.admin import CacheCap, evict, locked, read_entry
from wecolora.cache.images import StoreBatches, open_store, store_loader
from wecolora.cache.teacher import TeacherCache, ViewWriter, _to_numpy, default_cache_dir, open_for_run
from wecolora.config import DistillConfig
from wecolora.data.datasets import open_dataset
from wecolora.data.views import ViewRecipe
from wecolora.method.losses import feature_loss
from wecolora.method.student import build_student
from wecolora.teachers.vit import last_block_tokens
from wecolora.train.distill import distill

from conftest import tiny_vit


@pytest.fixture(scope="module")
def teacher28():
    return tiny_vit(img_size=28, patch_size=7).requires_grad_(False)


@pytest.fixture(scope="module")
def digits():
    return open_dataset("mnist-5k", "train")


@pytest.fixture(autouse=True)
def own_cache_root(tmp_path_factory, monkeypatch):
    """A cache root per test: the cap counts the image stores under it with the teacher entries."""
    root = tmp_path_factory.mktemp("cache-root")
    monkeypatch.setenv("WECOLORA_CACHE_DIR", str(root))
    return root


def _key_args(teacher, dataset, **overrides):
    args = dict(teacher=teacher, dataset=dataset, indices=list(range(0, 400, 10)),
                transform=ViewRecipe.for_model(teacher),
                seed=0, teacher_blocks=[5], norm=False, precision="fp32")
    args.update(overrides)
    return args


# ---------------------------------------------------------------------------------------------
# Keys


KEY_CHANGES = {
    # what changes: overrides of _key_args
    "views": lambda t: dict(transform=dataclasses.replace(ViewRecipe.for_model(t), hflip=0.2)),
    "image store bound": lambda t: dict(transform=dataclasses.replace(ViewRecipe.for_model(t), bound=40)),
    "subset": lambda t: dict(indices=list(range(1, 400, 10))),
    "seed": lambda t: dict(seed=1),
    "blocks": lambda t: dict(teacher_blocks=[2, 5]),
    "norm": lambda t: dict(norm=True),
    "precision": lambda t: dict(precision="bf16"),
}


@pytest.mark.parametrize("change", KEY_CHANGES)
def test_a_changed_input_is_another_cache_entry(tmp_path, teacher28, digits, change):
    same = TeacherCache.open(tmp_path, **_key_args(teacher28, digits))
    again = TeacherCache.open(tmp_path, **_key_args(teacher28, digits))
    changed = TeacherCache.open(tmp_path, **_key_args(teacher28, digits, **KEY_CHANGES[change](teacher28)))
    assert same.folder == again.folder
    assert changed.folder != same.folder
    assert (same.folder / "meta.json").is_file()


def test_changed_teacher_weights_are_another_entry(tmp_path, teacher28, digits):
    base = TeacherCache.open(tmp_path, **_key_args(teacher28, digits))
    other = tiny_vit(img_size=28, patch_size=7)
    with torch.no_grad():
        other.blocks[5].mlp.fc2.bias.add_(1e-3)
    assert TeacherCache.open(tmp_path, **_key_args(other, digits)).folder != base.folder


def test_default_cache_dir_shares_the_root(monkeypatch, tmp_path):
    monkeypatch.setenv("WECOLORA_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "teacher"
    assert default_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("WECOLORA_CACHE_DIR")
    assert str(default_cache_dir()).endswith(".cache/wecolora/teacher")


# ---------------------------------------------------------------------------------------------
# Views on disk


def _tokens(batch, blocks=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 5, 8, generator=generator) * 3 for _ in range(blocks)]


def test_a_view_is_complete_only_once_every_row_is_written(tmp_path, teacher28, digits):
    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits, teacher_blocks=[2, 5],
                                                                  indices=list(range(6))))
    writer = cache.writer(0, 6)
    written = {}
    for rows in ([4, 0, 2], [5, 1]):
        positions = torch.tensor(rows)
        tokens = _tokens(len(rows), seed=rows[0])
        stored = writer.write(positions, tokens)
        for i, p in enumerate(rows):
            written[p] = [t[i] for t in stored]
            for s, t in zip(stored, tokens):  # what training sees: the fp16-rounded tokens, in fp32
                assert s.dtype == torch.float32
                torch.testing.assert_close(s, t, atol=1e-2, rtol=1e-3)
    assert not cache.has_view(0)
    assert not writer.commit()  # row 3 is missing: nothing is published
    assert not cache.has_view(0) and not list(cache.folder.glob("*.npy")) and not list(cache.folder.glob(".*.tmp"))

    writer = cache.writer(0, 6)
    for p, tokens in written.items():
        writer.write(torch.tensor([p]), [t[None] for t in tokens])
    writer.write(torch.tensor([3]), _tokens(1))
    assert writer.commit() and cache.has_view(0) and not cache.has_view(1)
    tokens = cache.load_view(0)
    assert tokens.shape == (6, 2, 5, 8)
    for p, expected in written.items():
        for b in range(2):
            assert torch.equal(torch.from_numpy(np.array(tokens[p, b])).float(), expected[b])
    picked = cache.tokens(0, torch.tensor([5, 0]))
    assert len(picked) == 2 and torch.equal(picked[1][0].float(), written[5][1])


def test_bf16_views_round_trip(tmp_path, teacher28, digits):
    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits, precision="bf16", indices=[7, 9]))
    writer = cache.writer(0, 2)
    stored = writer.write(torch.tensor([1, 0]), _tokens(2, blocks=1))
    assert writer.commit() and cache.has_view(0)
    got = cache.tokens(0, torch.tensor([1, 0]))[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), stored[0])


def test_tokens_beyond_fp16_are_not_cached(tmp_path, teacher28, digits, caplog):
    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits))
    writer = cache.writer(0, 1)
    huge = [torch.full((1, 5, 8), 1e6)]
    assert torch.equal(writer.write(torch.tensor([0]), huge)[0], huge[0])  # trained on the exact values
    assert not writer.commit() and not cache.has_view(0)
    assert "fp16 range" in caplog.text


def test_open_for_run_policy(tmp_path, teacher28, digits, monkeypatch, caplog):
    args = {k: v for k, v in _key_args(teacher28, digits).items()}
    assert open_for_run(False, str(tmp_path), views=2, **args) is None
    assert open_for_run(True, str(tmp_path), views=2, **args) is not None
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: type("U", (), {"free": 10_000})())
    assert open_for_run(True, str(tmp_path), views=2, **args) is None
    assert "training without it" in caplog.text


# ---------------------------------------------------------------------------------------------
# Distillation with the cache


def _config(teacher_dir, output, cache_dir, **overrides):
    settings = dict(teacher=f"local-dir:{teacher_dir}", data="mnist-5k", output=str(output), ratio=0.02, epochs=2,
                    warmup_epochs=1, batch_size=16, accum_steps=2, blr=5e-3, num_workers=0, device="cpu", rank=4,
                    teacher_cache_dir=str(cache_dir))
    settings.update(overrides)
    return DistillConfig(**settings)


def _adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_a_warm_run_never_calls_the_teacher_and_ends_where_the_cold_run_did(teacher_dir, tmp_path, monkeypatch):
    cold = distill(_config(teacher_dir, tmp_path / "cold", tmp_path / "cache"))
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and sorted(p.name for p in entries[0].glob("view*")) == [
        "view0000.tokens.npy", "view0001.tokens.npy"]  # tokens only: views are cut again from the image store

    real = last_block_tokens
    calls = []

    def counting(model, images, *args, **kwargs):
        calls.append(len(model.blocks))
        return real(model, images, *args, **kwargs)

    for module in (distill_module, training_setup):  # the teacher's call and the student's
        monkeypatch.setattr(module, "last_block_tokens", counting)
    warm = distill(_config(teacher_dir, tmp_path / "warm", tmp_path / "cache"))
    assert 6 not in calls and calls  # the 6-block teacher never ran; the 3-block student did
    assert [r["loss"] for r in warm["epochs"]] == [r["loss"] for r in cold["epochs"]]
    a, b = _adapter(tmp_path / "cold"), _adapter(tmp_path / "warm")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A grid's other students share the entry; --no-teacher-cache computes the same thing, unrounded.
    for module in (distill_module, training_setup):  # the teacher's call and the student's
        monkeypatch.setattr(module, "last_block_tokens", real)
    plain = distill(_config(teacher_dir, tmp_path / "plain", tmp_path / "cache", teacher_cache=False))
    for r_plain, r_cold in zip(plain["epochs"], cold["epochs"]):
        assert r_plain["loss"] == pytest.approx(r_cold["loss"], rel=2e-3)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_the_cached_loss_equals_the_recomputed_teacher_loss_on_the_same_views(teacher28, digits, tmp_path):
    recipe = ViewRecipe.for_model(teacher28)
    indices = list(range(0, 4000, 250))
    store = open_store(digits, indices, bound=recipe.bound)
    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits, indices=indices))
    student = build_student(teacher28, 2, mode="wecolora", rank=4)
    batches = StoreBatches(store, indices, recipe, seed=0, view=1)
    writer = cache.writer(1, len(indices))
    fresh = []
    for batch in store_loader(batches, 5, torch.Generator().manual_seed(0)):
        images, positions = recipe.apply(batch["pixels"], batch["boxes"], batch["flips"]), batch["positions"]
        with torch.no_grad():
            targets = last_block_tokens(teacher28, images, [5])
            writer.write(positions, targets)
            fresh.append((images, positions, feature_loss(last_block_tokens(student, images), targets)["loss"]))
    assert writer.commit()
    for images, positions, expected in fresh:
        with torch.no_grad():
            cached = [t.float() for t in cache.tokens(1, positions)]
            loss = feature_loss(last_block_tokens(student, images), cached)["loss"]
        assert loss.item() == pytest.approx(expected.item(), rel=1e-3)


def test_an_interrupted_epoch_leaves_no_view_behind(teacher_dir, tmp_path, monkeypatch):
    real = distill_module.feature_loss
    steps = []

    def fail_on_third(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "feature_loss", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        distill(_config(teacher_dir, tmp_path / "run", tmp_path / "cache"))
    (entry,) = (tmp_path / "cache").iterdir()
    assert [p.name for p in entry.iterdir()] == ["meta.json"]  # no view, no temporary file


def test_a_full_disk_or_damaged_view_costs_speed_not_the_run(tmp_path, teacher28, digits, monkeypatch, caplog):
    import errno
    import os

    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits, indices=[0, 1]))
    real = os.posix_fallocate

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    writer = cache.writer(0, 2)
    tokens = _tokens(2, blocks=1)
    stored = writer.write(torch.tensor([0, 1]), tokens)
    torch.testing.assert_close(stored[0], tokens[0], atol=1e-2, rtol=1e-3)
    assert not writer.commit() and not list(cache.folder.glob("view*")) and not list(cache.folder.glob(".*.tmp"))
    assert "No space left" in caplog.text

    monkeypatch.setattr(os, "posix_fallocate", real)
    writer = cache.writer(0, 2)
    writer.write(torch.tensor([0, 1]), tokens)
    assert writer.commit() and cache.has_view(0)
    path = cache.folder / "view0000.tokens.npy"
    path.write_bytes(path.read_bytes()[:-100])  # truncated behind our back
    assert not cache.has_view(0)

    monkeypatch.setattr(teacher_cache, "atomic_write_text", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    assert open_for_run(True, str(tmp_path / "elsewhere"), views=1,
                                      **_key_args(teacher28, digits)) is None


def test_fewer_views_than_epochs_reuse_them_within_one_run(teacher_dir, tmp_path, monkeypatch):
    real = last_block_tokens
    teacher_steps = []

    def counting(model, images, *args, **kwargs):
        if len(model.blocks) == 6:
            teacher_steps.append(images.shape[0])
        return real(model, images, *args, **kwargs)

    for module in (distill_module, training_setup):  # the teacher's call and the student's
        monkeypatch.setattr(module, "last_block_tokens", counting)
    result = distill(_config(teacher_dir, tmp_path / "run", tmp_path / "cache", epochs=3, cache_views=1))
    assert sum(teacher_steps) == 80  # one pass over the 80 images: epochs 2 and 3 read view 0
    assert len(result["epochs"]) == 3
    (entry,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in entry.glob("view*")) == ["view0000.tokens.npy"]


def test_temporary_files_of_dead_writers_are_removed(tmp_path, teacher28, digits):
    import os
    import socket
    import subprocess

    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits))
    child = subprocess.Popen(["true"])  # its pid is free once it has exited
    child.wait()
    host = socket.gethostname()
    orphan = cache.folder / f".view0000.tokens.{host}-{child.pid}.abc.tmp"
    dotted = cache.folder / f".view0001.images.{host}-{child.pid}.x_9.tmp"
    other_host = cache.folder / f".view0000.tokens.elsewhere-{child.pid}.abc.tmp"
    alive = cache.folder / f".view0000.tokens.{host}-{os.getppid()}.abc.tmp"
    for path in (orphan, dotted, other_host, alive):
        path.write_bytes(b"x")
    TeacherCache.open(tmp_path, **_key_args(teacher28, digits))
    assert not orphan.exists() and not dotted.exists() and other_host.exists() and alive.exists()


# ---------------------------------------------------------------------------------------------
# Policy: off for a lone run, on where the tokens are read back


@pytest.mark.parametrize("teacher_cache, cache_dir, uses", [
    ("auto", None, False),  # a lone distill: its tokens would never be read back
    ("auto", "somewhere", True),  # --teacher-cache DIR asks for it
    ("on", None, True),
    ("off", "somewhere", False),  # --no-teacher-cache wins over a folder
    (True, None, True),  # wecolora 0.2 configs held a bool
    (False, None, False),
])
def test_the_cache_policy(teacher_cache, cache_dir, uses):
    config = DistillConfig(teacher="t", data="d", output="o", teacher_cache=teacher_cache, teacher_cache_dir=cache_dir)
    assert config.uses_teacher_cache() is uses and config.teacher_cache in ("auto", "on", "off")


def test_a_bad_policy_or_cap_is_refused(monkeypatch):
    from wecolora.cache.admin import cache_cap_bytes
    from wecolora.errors import UserError

    with pytest.raises(UserError, match="--cache-teacher 'maybe' is invalid: expected one of auto, on, off"):
        DistillConfig(teacher="t", data="d", output="o", teacher_cache="maybe")
    with pytest.raises(UserError, match="--cache-max-gb 0 is invalid"):
        DistillConfig(teacher="t", data="d", output="o", cache_max_gb=0)
    monkeypatch.delenv("WECOLORA_CACHE_MAX_GB", raising=False)
    assert cache_cap_bytes() == 50 * 10**9 and cache_cap_bytes(0.25) == 250 * 10**6
    monkeypatch.setenv("WECOLORA_CACHE_MAX_GB", "2")
    assert cache_cap_bytes() == 2 * 10**9 and cache_cap_bytes(1) == 10**9  # the setting beats the variable
    monkeypatch.setenv("WECOLORA_CACHE_MAX_GB", "lots")
    with pytest.raises(UserError, match="WECOLORA_CACHE_MAX_GB='lots' is invalid"):
        cache_cap_bytes()


def test_a_lone_distill_writes_no_cache_unless_asked(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WECOLORA_CACHE_DIR", str(tmp_path / "root"))
    settings = dict(teacher=f"local-dir:{teacher_dir}", data="mnist-5k", ratio=0.02, epochs=1, warmup_epochs=0,
                    batch_size=16, accum_steps=1, num_workers=0, device="cpu", rank=4)
    distill(DistillConfig(output=str(tmp_path / "lone"), **settings))
    assert not (tmp_path / "root" / "teacher").exists()  # only the image store, which every run reads
    saved = yaml.safe_load((tmp_path / "lone" / "config.yaml").read_text())
    assert saved["settings"]["teacher_cache"] == "auto" and saved["resolved"]["teacher_cache"] is None

    distill(DistillConfig(output=str(tmp_path / "asked"), teacher_cache="on", **settings))
    (entry,) = (tmp_path / "root" / "teacher").iterdir()
    assert sorted(p.name for p in entry.glob("view*")) == ["view0000.tokens.npy"]
    assert yaml.safe_load((tmp_path / "asked" / "config.yaml").read_text())["resolved"]["teacher_cache"] == str(entry)


# ---------------------------------------------------------------------------------------------
# The writer thread


def _batch(n, offset=0):
    return torch.arange(offset, offset + n), _tokens(n, seed=offset)


def test_views_are_written_on_the_writer_thread(tmp_path, teacher28, digits, monkeypatch):
    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits, indices=list(range(8))))
    real, threads = _to_numpy, []

    def recording(tokens):
        threads.append(threading.current_thread().name)
        return real(tokens)

    monkeypatch.setattr(teacher_cache, "_to_numpy", recording)
    writer = cache.writer(0, 8)
    for offset in (0, 4):
        stored = writer.write(*_batch(4, offset))
        assert all(s.dtype == torch.float32 for s in stored)  # rounded on the tokens' device, returned at once
    assert writer.commit() and cache.has_view(0)
    assert threads == ["wecolora-view0000-writer"] * 2 and writer._thread is None


def test_the_queue_of_batches_in_flight_is_bounded(tmp_path, teacher28, digits, monkeypatch):
    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits, indices=list(range(16))))
    release, real = threading.Event(), _to_numpy
    monkeypatch.setattr(teacher_cache, "_to_numpy", lambda tokens: (release.wait(10), real(tokens))[1])
    writer = cache.writer(0, 16)
    writer.write(*_batch(1, 0))  # taken by the thread, which then waits on a slow disk
    time.sleep(0.1)
    for offset in range(1, 1 + ViewWriter.QUEUE_BATCHES):  # fill the queue
        writer.write(*_batch(1, offset))
    blocked = threading.Thread(target=writer.write, args=_batch(1, 15))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # one batch more waits for the disk instead of piling up in memory
    release.set()
    blocked.join(10)
    assert not blocked.is_alive()
    writer.abort()


def _failing_memmap(monkeypatch, error):
    """Every write into a view's memory-mapped file raises ``error``."""
    class Failing(np.memmap):
        def __setitem__(self, index, value):
            raise error

    real = np.lib.format.open_memmap
    monkeypatch.setattr(np.lib.format, "open_memmap", lambda *a, **k: real(*a, **k).view(Failing))


def test_a_disk_error_in_the_writer_thread_costs_the_view_not_the_run(tmp_path, teacher28, digits, monkeypatch,
                                                                      caplog):
    import errno

    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits, indices=list(range(40))))
    _failing_memmap(monkeypatch, OSError(errno.EIO, "Input/output error"))
    writer = cache.writer(0, 40)
    for offset in range(0, 40, 4):  # more batches than the queue holds: a failed thread never blocks training
        positions, tokens = _batch(4, offset)
        stored = writer.write(positions, tokens)
        torch.testing.assert_close(stored[0], tokens[0], atol=1e-2, rtol=1e-3)  # trained on, rounded as stored
    assert not writer.commit()
    assert caplog.text.count("cannot store view 0") == 1 and "Input/output error" in caplog.text
    assert not cache.has_view(0) and not list(cache.folder.glob("view*")) and not list(cache.folder.glob(".*.tmp"))
    assert writer._thread is None


def test_any_other_error_in_the_writer_thread_is_raised_at_the_next_write_or_commit(tmp_path, teacher28, digits,
                                                                                    monkeypatch):
    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits, indices=list(range(8))))
    _failing_memmap(monkeypatch, ValueError("a bug in the writer"))
    writer = cache.writer(0, 8)
    writer.write(*_batch(4, 0))
    with pytest.raises(ValueError, match="a bug in the writer"):
        writer.write(*_batch(4, 4))
        writer.commit()  # if the thread had not got to the first batch yet
    writer.abort()
    assert not list(cache.folder.glob(".*.tmp")) and not cache.has_view(0)


def test_abort_stops_the_thread_and_leaves_no_temporary_file(tmp_path, teacher28, digits):
    cache = TeacherCache.open(tmp_path, **_key_args(teacher28, digits, indices=list(range(12))))
    writer = cache.writer(0, 12)
    for offset in (0, 4):
        writer.write(*_batch(4, offset))
    writer.abort()
    assert writer._thread is None and not list(cache.folder.glob(".*.tmp")) and not list(cache.folder.glob("view*"))
    assert not [t for t in threading.enumerate() if t.name.startswith("wecolora-view")]


# ---------------------------------------------------------------------------------------------
# The size cap


VIEW_BYTES = 40 * 17 * 32 * 2  # 40 images: tokens [1, 17, 32] fp16


def _open(root, teacher, dataset, seed, *, views=1, max_gb=1.0):
    return open_for_run(True, str(root), views=views, cap=CacheCap.resolve(max_gb, str(root)),
                                      **_key_args(teacher, dataset, seed=seed))


def _fill(cache, view=0):
    n = cache.key["images"]
    writer = cache.writer(view, n)
    writer.write(torch.arange(n), [torch.zeros(n, 17, 32)])
    assert writer.commit()
    return cache


def _last_used(cache, days_ago):
    stamp = time.time() - days_ago * 86400
    os.utime(cache.folder / "meta.json", (stamp, stamp))


def test_a_new_entry_evicts_the_least_recently_used_not_the_one_in_use(tmp_path, teacher28, digits, caplog):
    caplog.set_level("INFO", logger="wecolora")
    old, recent = _fill(_open(tmp_path, teacher28, digits, 1)), _fill(_open(tmp_path, teacher28, digits, 2))
    _last_used(old, 3)
    _last_used(recent, 1)
    size = read_entry(old.folder, "teacher").bytes
    assert VIEW_BYTES < size < VIEW_BYTES + 2000  # the estimate open_for_run makes room with
    cap_gb = (2 * size + 1000) / 1e9  # two entries of one view fit, three do not

    new = _fill(_open(tmp_path, teacher28, digits, 3, max_gb=cap_gb))
    assert not old.folder.exists() and recent.folder.is_dir() and new.folder.is_dir()
    assert "evicted" in caplog.text

    # Now the entry in use is the least recently used: a second view for it evicts the other one instead.
    _last_used(new, 10)
    again = _open(tmp_path, teacher28, digits, 3, views=2, max_gb=cap_gb)
    assert again.folder == new.folder and again.has_view(0) and not recent.folder.exists()
    # A run whose own views cannot fit under the cap trains without the cache.
    assert _open(tmp_path, teacher28, digits, 4, views=3, max_gb=cap_gb) is None
    assert "over the cache's" in caplog.text and new.folder.is_dir()


def test_a_view_write_evicts_an_old_image_store_not_in_use(tmp_path, teacher28, digits, own_cache_root):
    from test_cache_admin import fake_image_store

    cap_gb = (2 * VIEW_BYTES + 2000) / 1e9  # the entry's two views fit, not with the store
    cache = _fill(_open(tmp_path, teacher28, digits, 1, max_gb=cap_gb))
    old = fake_image_store(own_cache_root, "old", days_ago=3, nbytes=VIEW_BYTES)
    _fill(cache, view=1)
    assert not old.exists() and cache.has_view(0) and cache.has_view(1)


HOLD_LOCK = ("import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_SH); print('locked', flush=True); "
             "time.sleep(60)")


@pytest.mark.parametrize("kind", ["writer", "user"])
def test_an_entry_a_live_process_writes_or_uses_is_never_evicted(tmp_path, teacher28, digits, caplog, kind):
    import socket
    import subprocess
    import sys

    busy = _fill(_open(tmp_path, teacher28, digits, 1))
    _last_used(busy, 5)
    if kind == "writer":  # another live process of this host writes a view into it
        other = subprocess.Popen(["sleep", "60"])
        (busy.folder / f".view0001.tokens.{socket.gethostname()}-{other.pid}.abc.tmp").write_bytes(b"x")
    else:  # another run trains with it (its use lock)
        other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(busy.folder / "meta.json")],
                                 stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline() == "locked\n"
    try:
        size = read_entry(busy.folder, "teacher").bytes
        assert _open(tmp_path, teacher28, digits, 2, max_gb=(size + VIEW_BYTES) / 1e9 * 0.99) is None
        assert "entries in use by other runs" in caplog.text and busy.folder.is_dir()
        assert not evict(busy.folder) and busy.folder.is_dir()
    finally:
        other.kill()
        other.wait()
    # Once that process is gone the entry is like any other: evicted when room is needed.
    assert _open(tmp_path, teacher28, digits, 2, max_gb=(size + VIEW_BYTES) / 1e9 * 0.99) is not None
    assert not busy.folder.exists()


def test_a_run_holds_its_entry_until_the_next_run_of_the_process(tmp_path, teacher28, digits):
    first = _open(tmp_path, teacher28, digits, 1)
    assert locked(first.folder) and not evict(first.folder)
    second = _open(tmp_path, teacher28, digits, 2)
    assert not locked(first.folder) and locked(second.folder)
    assert open_for_run(False, str(tmp_path), views=1, **_key_args(teacher28, digits)) is None
    assert not locked(second.folder)  # a run without the cache holds none
