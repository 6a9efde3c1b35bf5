"""Bad input, interruptions and untrusted files lose nothing: the command line end to end.

* a catalogue of bad inputs (``CASES``), each run as ``python -m wecolora ...`` in a process of its own:
  exit status 2, one line ``wecolora: error: ...`` naming the problem, no traceback, and every earlier
  file byte-identical (``WECOLORA_KILL_SEED`` replays a failed kill test);
* SIGKILL at random steps, then ``--resume auto``: the same adapter as an uninterrupted run;
* a kill in the middle of a checkpoint write, a full disk during export, a non-finite loss;
* hostile ``.pth`` pickles are refused without running; damaged images are skipped or stop the run.
"""
import hashlib
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from wecolora.cli import one_line
from wecolora.data.datasets import BUILTIN_DATASETS, open_dataset
from wecolora.data.layout import IMAGE_EXTENSIONS
from wecolora.data.subset import _decodes, drop_unreadable
from wecolora.errors import UserError
from wecolora.evaluation.knn import knn
from wecolora.evaluation.probe import probe
from wecolora.export import RUN_INFO
from wecolora.teachers.load import load_model
from wecolora.train.checkpoint import OPTIMIZER, STATE, WEIGHTS

# One thread per process: these tiny models gain nothing from more, and a busy 2-core machine makes
# oversubscribed OpenMP threads spin (2-3x slower). Every run, interrupted or not, uses the same setting.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
TINY = ["--ratio", "0.02", "--warmup-epochs", "1", "--batch-size", "16", "--accum-steps", "1", "--num-workers", "0",
        "--device", "cpu", "--rank", "4", "--blr", "5e-3"]
EPOCHS, STEPS_PER_EPOCH = 4, 5  # 2% of 400 digits x 10 classes = 80 images, batches of 16


def cli(*args, env=None, preexec_fn=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wecolora", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, preexec_fn=preexec_fn, timeout=timeout)


def distill_args(teacher_dir, output, *extra):
    return ["distill", "--teacher", f"local-dir:{teacher_dir}", "--data", "mnist-5k", "--output", output,
            "--epochs", EPOCHS, *TINY, *extra]


def assert_user_error(proc, fragment):
    """Exit 2, the fragment in a single ``wecolora: error:`` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("wecolora: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert fragment in errors[0], errors[0]


def snapshot(*roots) -> dict[str, str]:
    """Every file and folder under ``roots`` with a hash of its bytes."""
    found = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def adapter_weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run) / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(run, reference):
    got, want = adapter_weights(run), adapter_weights(reference)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)


# ---------------------------------------------------------------- files the catalogue works on


class WouldRun:
    """Unpickling this creates a file: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def save_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def digit(seed):
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


def odd_images(folder):
    """One image of each awkward kind: grey, grey+alpha, RGBA, palette with transparency, CMYK JPEG, 16-bit."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = digit(99)
    Image.fromarray(grey).save(folder / "grey.png")
    Image.fromarray(grey).convert("LA").save(folder / "grey_alpha.png")
    Image.fromarray(np.dstack([grey, grey, grey, grey])).save(folder / "rgba.png")
    palette = Image.fromarray(grey).convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray(grey).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen_bit.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_dir):
    """Datasets, earlier runs and hostile files that the bad inputs of the catalogue point at."""
    root = tmp_path_factory.mktemp("world")
    for split, n in (("train", 6), ("test", 2)):
        for c in ("0", "1"):
            for i in range(n):
                save_png(root / "digits" / split / c / f"{i}.png", digit(i))
    for c, n in (("a", 20), ("b", 2)):
        for i in range(n):
            save_png(root / "lopsided" / c / f"{i}.png", digit(i))
    save_png(root / "empty_class" / "a" / "0.png", digit(0))
    (root / "empty_class" / "b").mkdir()
    (root / "no_classes").mkdir()
    for i in range(10):
        save_png(root / "rotten" / "a" / f"{i}.png", digit(i))
        (root / "rotten" / "b" / f"{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / "rotten" / "b" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not a dataset\n")
    (root / "names.csv").write_text("name,label\na,b\n")
    (root / "digits.csv").write_text("path,label\ndigits/train/0/0.png,0\ndigits/train/1/0.png,1\n")

    finished = root / "finished"  # what a completed distill leaves (contents only matter byte-wise)
    for name, text in (("adapter/wecolora.json", '{"mode": "wecolora"}'), ("adapter/adapter_model.safetensors", "w"),
                       ("student/config.json", "{}"), ("student/model.safetensors", "weights"),
                       ("config.yaml", "settings: {}\n"), ("summary.csv", "epoch,loss\n1,0.5\n"),
                       ("subset.txt", "train/000001\n"), ("model/config.json", "{}")):
        (finished / name).parent.mkdir(parents=True, exist_ok=True)
        (finished / name).write_text(text)
    interrupted = root / "interrupted"
    for name in ("checkpoint/trainable.safetensors", "checkpoint/optimizer.pt", "checkpoint/state.json", "config.yaml"):
        (interrupted / name).parent.mkdir(parents=True, exist_ok=True)
        (interrupted / name).write_text("x")

    torch.save({"model": {"w": torch.zeros(1)}, "payload": WouldRun(root / "PWNED")}, root / "evil.pth")
    with open(root / "evil_raw.pth", "wb") as f:
        pickle.dump(WouldRun(root / "PWNED"), f)
    (root / "junk.safetensors").write_bytes(b"\x00" * 64)
    weights = load_file(str(Path(teacher_dir) / "model.safetensors"))
    weights["blocks.0.attn.qkv.weight"] = torch.zeros(10, 32)
    weights.pop("blocks.5.mlp.fc2.bias")
    torch.save(weights, root / "mismatch.pth")
    (root / "bad.yaml").write_text("epochs: [1, 2\n")
    (root / "unknown.yaml").write_text("epochs: 2\nlearning_rate: 0.1\n")
    (root / "read_only" / "earlier").mkdir(parents=True)
    (root / "read_only" / "earlier" / "results.json").write_text('{"top1": 0.5}')
    return root


def make_read_only(folder) -> bool:
    """Make ``folder`` unwritable even for root (chattr +i where needed); False if impossible here."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    chattr = shutil.which("chattr")
    return bool(chattr) and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0


def make_writable(folder) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o755)
    elif shutil.which("chattr"):
        subprocess.run([shutil.which("chattr"), "-i", str(folder)], capture_output=True)


# ---------------------------------------------------------------- the catalogue

# (id, command line with {root} (the world folder), {teacher} (a tiny ViT folder) and {out} (this case's
# own output folder), the fragment the one error line must hold). Every case must exit with status 2.
D = "distill --teacher local-dir:{teacher} --data mnist-5k --output {out} --device cpu --num-workers 0"
CASES = [
    # data
    ("data-missing", "distill --teacher local-dir:{teacher} --data {root}/nope --output {out}",
     "is neither an existing folder nor a built-in name"),
    ("data-is-a-file", "distill --teacher local-dir:{teacher} --data {root}/bad.yaml --output {out}", "is a file"),
    ("data-list-of-missing-files", "distill --teacher local-dir:{teacher} --data {root}/notes.txt --output {out}",
     "names images that do not exist (first: {root}/not a dataset)"),
    ("data-csv-without-a-path-column", "distill --teacher local-dir:{teacher} --data {root}/names.csv --output {out}",
     "has no path column (columns: name, label); name the column of image paths with --image-column"),
    ("subset-per-class-on-an-unlabeled-folder", "distill --teacher local-dir:{teacher} --data {root}/rotten/a "
     "--subset per-class --output {out} --device cpu", "--subset per-class needs labels, and {root}/rotten/a is unlabeled"),
    ("subset-unknown", D + " --subset best", "argument --subset: invalid choice: 'best'"),
    ("images-and-per-class", D + " --images 5 --per-class 2", "--per-class 2 and --images 5 both size the subset"),
    ("coreset-pool-one", D + " --coreset-pool 1", "--coreset-pool 1 is invalid: expected an integer >= 2"),
    ("data-without-class-folders", "distill --teacher local-dir:{teacher} --data {root}/no_classes --output {out}",
     "no class folders in"),
    ("data-empty-class", "distill --teacher local-dir:{teacher} --data {root}/empty_class --output {out}",
     "class folder(s) b in"),
    ("ratio-zero-images-in-a-class", "distill --teacher local-dir:{teacher} --data {root}/lopsided --ratio 0.1 "
     "--output {out} --device cpu", "class b (2 images -> 0)"),
    ("min-per-class-not-met", D + " --ratio 0.01 --min-per-class 5", "keeps fewer than 5 image(s)"),
    ("too-many-unreadable-images", "distill --teacher local-dir:{teacher} --data {root}/rotten --ratio 1 "
     "--output {out} --device cpu", "10 of the 20 chosen images cannot be read"),
    # ranges and choices
    ("ratio-zero", D + " --ratio 0", "--ratio 0.0 is invalid: expected a fraction in (0, 1]"),
    ("ratio-above-one", D + " --ratio 1.5", "--ratio 1.5 is invalid"),
    ("ratio-negative", D + " --ratio -0.5", "--ratio -0.5 is invalid"),
    ("per-class-zero", D + " --per-class 0", "--per-class 0 is invalid"),
    ("min-per-class-negative", D + " --min-per-class -1", "--min-per-class -1 is invalid"),
    ("reduction-zero", D + " --reduction 0", "--reduction 0 is invalid: expected an integer >= 1"),
    ("reduction-at-depth", D + " --reduction 6", "reduction 6 is impossible for a 6-block teacher"),
    ("keep-outside-the-teacher", D + " --keep 0,9", "must be a non-empty list within 0..5"),
    ("keep-not-numbers", D + " --keep 0,x", "--keep '0,x' is invalid"),
    ("rank-zero", D + " --rank 0", "--rank 0 is invalid: expected an integer >= 1"),
    ("rank-above-width", D + " --rank 64", "rank 64 does not fit the teacher's width 32"),
    # student width (the teacher: width 32, 4 heads of 8, 128 MLP neurons, 6 blocks) and shape budgets
    ("width-not-whole-heads", D + " --embed-dim 20", "--embed-dim 20 does not fit the teacher (width 32, 4 heads of "
     "8): whole heads are kept, so choose a multiple of the head size 8 from 8 to 32"),
    ("width-above-the-teacher", D + " --embed-dim 64", "--embed-dim 64 does not fit the teacher"),
    ("width-zero", D + " --embed-dim 0", "--embed-dim 0 is invalid: expected a positive integer"),
    ("heads-above-the-teacher", D + " --heads 5", "--heads 5 is more than the teacher's 4: choose 1 to 4"),
    ("mlp-hidden-above-the-teacher", D + " --mlp-hidden 256", "--mlp-hidden 256 is more than the teacher's 128"),
    ("mlp-hidden-zero", D + " --mlp-hidden 0", "--mlp-hidden 0 is invalid"),
    ("width-and-heads-disagree", D + " --embed-dim 16 --heads 3", "--embed-dim 16 and --heads 3 disagree: heads keep "
     "the teacher's size 8, so give --embed-dim 24 with --heads 3, or --heads 2 with --embed-dim 16"),
    ("width-ratio-and-widths", D + " --width-ratio 0.5 --embed-dim 16", "--width-ratio 0.5 cannot be combined"),
    ("width-ratio-zero", D + " --width-ratio 0", "--width-ratio 0.0 is invalid: expected a fraction in (0, 1]"),
    ("rank-above-student-width", D + " --embed-dim 16 --rank 20", "rank 20 does not fit the student's width 16"),
    ("budget-and-widths", D + " --speedup 2 --embed-dim 16", "--speedup chooses the student's shape, so it cannot be "
     "combined with --embed-dim"),
    ("two-budgets", D + " --speedup 2 --params 1e5", "give one budget, not --speedup and --params"),
    ("budget-not-positive", D + " --latency-ms 0", "--latency-ms 0.0 is invalid: expected a positive number"),
    ("keep-repeats-a-block", D + " --keep 0,0,1,2,3,4", "--keep 0,0,1,2,3,4 names block(s) 0 more than once"),
    ("unknown-mode", D + " --mode distil", "argument --mode: invalid choice: 'distil'"),
    ("epochs-zero", D + " --epochs 0", "--epochs 0 is invalid"),
    ("warmup-not-below-epochs", D + " --epochs 3 --warmup-epochs 3", "--warmup-epochs 3 does not fit --epochs 3"),
    ("not-an-integer", D + " --epochs two", "argument --epochs: invalid int value: 'two'"),
    ("unknown-option", D + " --learning-rate 1", "unrecognized arguments: --learning-rate"),
    ("missing-teacher", "distill --data mnist-5k --output {out}", "missing required setting(s): --teacher"),
    # teachers and weights
    ("teacher-folder-missing", "distill --teacher local-dir:{root}/nope --data mnist-5k --output {out}",
     "model folder {root}/nope does not exist"),
    ("teacher-folder-without-config", "distill --teacher {root}/no_classes --data mnist-5k --output {out}",
     "is a folder without config.json"),
    ("teacher-not-a-vit", D.replace("local-dir:{teacher}", "resnet18"),
     "teacher is a ResNet, not a timm VisionTransformer"),
    ("teacher-unsupported-blocks", D.replace("local-dir:{teacher}", "vit_base_patch16_rpn_224"),
     "block 0 of the teacher is ResPostBlock"),
    ("teacher-unknown-name", D.replace("local-dir:{teacher}", "vit_nonexistent_patch3"),
     "unknown model 'vit_nonexistent_patch3'"),
    ("image-size-not-a-multiple-of-patch", D + " --img-size 30", "not a multiple of the teacher's patch size (7, 7)"),
    ("weights-missing", D + " --teacher-weights {root}/nope.pth", "--teacher-weights {root}/nope.pth does not exist"),
    ("weights-unknown-format", D + " --teacher-weights {root}/notes.txt", "unknown weights format"),
    ("weights-malicious-pickle", D + " --teacher-weights {root}/evil.pth", "would import io.open"),
    ("weights-malicious-raw-pickle", D + " --teacher-weights {root}/evil_raw.pth", "refusing to load"),
    ("weights-not-safetensors", D + " --teacher-weights {root}/junk.safetensors", "is not a valid safetensors file"),
    ("weights-shape-and-key-mismatch", D + " --teacher-weights {root}/mismatch.pth",
     "missing keys blocks.5.mlp.fc2.bias; shape mismatch blocks.0.attn.qkv.weight file [10, 32] vs model [96, 32]"),
    # output folders and resuming
    ("output-is-a-file", D.replace("{out}", "{root}/notes.txt"),
     "--output {root}/notes.txt exists and is not a folder"),
    ("output-holds-a-finished-run", D.replace("{out}", "{root}/finished"),
     "already holds a finished run; pass --overwrite"),
    ("output-holds-an-interrupted-run", D.replace("{out}", "{root}/interrupted"),
     "holds an interrupted run; pass --resume auto"),
    ("output-read-only", D.replace("{out}", "{root}/read_only/run"), "is not writable"),
    ("resume-missing", D + " --resume {root}/nope", "--resume {root}/nope is not a checkpoint folder"),
    ("resume-incomplete", D + " --resume {root}/no_classes", "is not a complete wecolora checkpoint"),
    ("config-file-missing", D + " --config {root}/nope.yaml", "config file {root}/nope.yaml does not exist"),
    ("config-file-not-yaml", D + " --config {root}/bad.yaml", "is not valid YAML"),
    ("config-file-unknown-setting", D + " --config {root}/unknown.yaml", "unknown setting(s) learning_rate"),
    ("cuda-without-a-gpu", D.replace("--device cpu", "--device cuda"), "--device cuda was asked for"),
    # other subcommands
    ("inspect-teacher-missing", "inspect --teacher local-dir:{root}/nope", "does not exist"),
    ("inspect-rank-above-width", "inspect --teacher local-dir:{teacher} --rank 33",
     "does not fit the teacher's width 32"),
    ("inspect-width-not-whole-heads", "inspect --teacher local-dir:{teacher} --embed-dim 12",
     "--embed-dim 12 does not fit the teacher"),
    ("plan-widths-not-whole-heads", "plan --teacher local-dir:{teacher} --embed-dims 8 12 --device cpu",
     "--embed-dims 12 do not fit the teacher (width 32, 4 heads of 8)"),
    ("plan-two-budgets", "plan --teacher local-dir:{teacher} --speedup 2 --latency-ms 3 --device cpu",
     "give one budget, not --speedup and --latency-ms"),
    ("pretrain-patch-not-dividing", "pretrain --data mnist-5k --output {out} --patch-size 5",
     "--patch-size 5 is invalid: expected a divisor of --img-size 28"),
    ("pretrain-data-without-test-split", "pretrain --data {root}/lopsided --output {out}", "train split only"),
    ("pretrain-output-finished", "pretrain --data mnist-5k --output {root}/finished", "already holds a finished run"),
    ("probe-model-missing", "probe --model local-dir:{root}/nope --data mnist-5k --output {out}", "does not exist"),
    ("probe-data-missing", "probe --model local-dir:{teacher} --data {root}/nope --output {out}",
     "is neither an existing folder nor a built-in name"),
    ("probe-unlabeled-folder", "probe --model local-dir:{teacher} --data {root}/rotten/a --test-data {root}/rotten/a "
     "--output {out}", "is read as an unlabeled folder (images directly inside), and this command (probe, knn, pretrain"),
    ("probe-list-without-a-test-split", "probe --model local-dir:{teacher} --data {root}/digits.csv --output {out}",
     "has no test split of its own; give the test images with --test-data"),
    ("probe-epochs-zero", "probe --model local-dir:{teacher} --data mnist-5k --output {out} --epochs 0 --device cpu",
     "--epochs 0 is invalid"),
    ("knn-k-zero", "knn --model local-dir:{teacher} --data mnist-5k --output {out} --k 0 --device cpu",
     "--k 0 is invalid"),
    ("knn-output-is-a-file", "knn --model local-dir:{teacher} --data mnist-5k --output {root}/notes.txt",
     "exists and is not a folder"),
    ("report-without-results", "report {root}/digits --output {out}", "does not exist"),
    ("ablate-unknown-preset", "ablate --preset nope --output {out}", "unknown preset 'nope'"),
    ("ablate-config-missing", "ablate --config {root}/nope.yaml --output {out}", "does not exist"),
    ("ablate-data-missing", "ablate --preset demo --data {root}/nope --output {out}",
     "--data '{root}/nope' is neither an existing folder"),
    ("ablate-probe-data-without-test-split", "ablate --preset demo --probe-data {root}/lopsided --output {out}",
     "--probe-data {root}/lopsided has no train/ folder, so it is the train split only"),
    ("demo-output-is-a-file", "demo --output {root}/notes.txt", "--output {root}/notes.txt exists and is not a folder"),
    ("cache-teacher-unknown", D + " --cache-teacher maybe", "argument --cache-teacher: invalid choice: 'maybe'"),
    ("cache-max-gb-zero", D + " --cache-teacher on --cache-max-gb 0", "--cache-max-gb 0.0 is invalid"),
    ("cache-dir-missing", "cache list --cache-dir {root}/nope", "--cache-dir {root}/nope does not exist"),
    ("cache-unknown-action", "cache purge", "argument ACTION: invalid choice: 'purge'"),
    ("cache-clear-without-a-choice", "cache clear --cache-dir {root}", "give --all or --older-than DAYS"),
]


# Runs each case as ``python -m wecolora ARGS`` would, in a process of its own forked from one that has
# imported the package once: the same exit status and stderr, about 50x cheaper than a fresh interpreter
# (torch + timm take ~3 s to import) and no state shared between cases.
FORKING_RUNNER = textwrap.dedent("""
    import importlib, json, os, runpy, sys, traceback
    for module in ("cli", "distill", "pretrain", "evaluate", "ablate"):
        try:
            importlib.import_module(f"wecolora.{module}")
        except ImportError:
            pass
    cases, out = json.load(open(sys.argv[1])), sys.argv[2]
    results = {}
    for name, argv in cases:
        err_path = f"{out}.{name}.stderr"
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.argv, code = ["wecolora", *argv], 1
            try:
                runpy.run_module("wecolora", run_name="__main__", alter_sys=True)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except BaseException:
                traceback.print_exc()  # what the interpreter prints for an uncaught exception
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        results[name] = [os.waitstatus_to_exitcode(status), open(err_path).read()]
    json.dump(results, open(out, "w"))
""")


def case_argv(command, world, teacher_dir, name):
    return command.format(root=world, teacher=teacher_dir, out=world / "out" / name).split()


@pytest.fixture(scope="module")
def catalogue(world, teacher_dir, tmp_path_factory):
    """Run every case and snapshot the world before and after."""
    cases = [c for c in CASES if not (c[0] == "cuda-without-a-gpu" and torch.cuda.is_available())]
    read_only = make_read_only(world / "read_only")
    scratch = tmp_path_factory.mktemp("catalogue")
    (scratch / "cases.json").write_text(json.dumps([[n, case_argv(c, world, teacher_dir, n)] for n, c, _ in cases]))
    before = snapshot(world, teacher_dir)
    try:
        proc = subprocess.run([sys.executable, "-c", FORKING_RUNNER, scratch / "cases.json", scratch / "results.json"],
                              capture_output=True, text=True, env=ENV, timeout=600)
    finally:
        make_writable(world / "read_only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {name: subprocess.CompletedProcess([], status, "", stderr)
               for name, (status, stderr) in json.loads((scratch / "results.json").read_text()).items()}
    return {"results": results, "before": before, "after": snapshot(world, teacher_dir), "read_only": read_only}


def test_the_catalogue_is_large_and_names_are_unique():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, command, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_and_changes_nothing(catalogue, world, teacher_dir, name, command, fragment):
    if name == "output-read-only" and not catalogue["read_only"]:
        pytest.skip("cannot make a folder read-only here")
    if name not in catalogue["results"]:
        pytest.skip("a CUDA device is present")
    assert_user_error(catalogue["results"][name], fragment.format(root=world, teacher=teacher_dir))
    assert not (world / "out" / name).exists()  # nothing half-written left behind as if complete
    changed = {k for k in catalogue["before"].keys() | catalogue["after"].keys()
               if catalogue["before"].get(k) != catalogue["after"].get(k)}
    assert not changed  # earlier runs, datasets and teacher byte-identical; no hostile file created


@pytest.mark.parametrize("name", ["weights-malicious-pickle", "output-holds-a-finished-run", "unknown-option"])
def test_a_fresh_interpreter_gives_the_same_answer(catalogue, world, teacher_dir, name):
    command, fragment = next((c, f) for n, c, f in CASES if n == name)
    proc = cli(*case_argv(command, world, teacher_dir, name))
    assert_user_error(proc, fragment.format(root=world, teacher=teacher_dir))
    assert proc.stderr == catalogue["results"][name].stderr


def test_bad_input_fails_before_torch_is_imported(world, teacher_dir):
    """Path mistakes are reported in a fraction of the time a model import takes."""
    code = textwrap.dedent(f"""
        import sys
        from wecolora.cli import main
        status = main(["distill", "--teacher", "local-dir:{teacher_dir}", "--data", "{world}/nope", "--output", "x"])
        assert status == 2 and "torch" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)[:5]
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- interruptions


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, teacher_dir):
    """An uninterrupted run: the reference every interrupted-and-resumed run must reproduce."""
    run = tmp_path_factory.mktemp("whole") / "run"
    proc = cli(*distill_args(teacher_dir, run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


# Runs the CLI and freezes it (SIGSTOP) right after its progress bar has counted a given number of
# batches (all epochs); the test then SIGKILLs it from outside. The kill lands at a chosen step, not
# at whatever step a busy machine lets a reader notice.
STOP_AT_STEP = textwrap.dedent("""
    import os, signal, sys
    import tqdm.std
    from wecolora import cli
    target, real_update = int(sys.argv[1]), tqdm.std.tqdm.update

    def update(self, n=1):
        result = real_update(self, n)
        if self.n >= target:
            os.kill(os.getpid(), signal.SIGSTOP)
        return result

    tqdm.std.tqdm.update = update
    sys.exit(cli.main(sys.argv[2:]))
""")


def kill_at_step(args, step) -> int:
    """SIGKILL a CLI run right after batch ``step``; returns the wait status code (-9 when killed)."""
    proc = subprocess.Popen([sys.executable, "-c", STOP_AT_STEP, str(step), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)  # it ended (or failed) by itself: reaped already
        return proc.returncode
    os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=60)


def test_sigkill_at_random_steps_then_resume_ends_like_an_uninterrupted_run(whole_run, teacher_dir, tmp_path):
    seed = int(os.environ.get("WECOLORA_KILL_SEED", random.randrange(10_000)))
    rng = random.Random(seed)
    total = EPOCHS * STEPS_PER_EPOCH
    targets = [rng.randint(1, STEPS_PER_EPOCH - 1),  # before the first checkpoint: resume starts afresh
               rng.randint(STEPS_PER_EPOCH + 1, 3 * STEPS_PER_EPOCH - 1),
               rng.randint(3 * STEPS_PER_EPOCH + 1, total - 1)]
    run = tmp_path / "run"
    for target in targets:
        status = kill_at_step(distill_args(teacher_dir, run, "--resume", "auto"), target)
        assert status == -signal.SIGKILL, f"seed {seed}: the run ended by itself before step {target} ({status})"
        assert not (run / "adapter").exists(), f"seed {seed}"
        # From the second kill on, an epoch has ended, so there is a checkpoint to resume from.
        assert (run / "checkpoint" / "state.json").is_file() == (target > STEPS_PER_EPOCH), f"seed {seed}"
    proc = cli(*distill_args(teacher_dir, run, "--resume", "auto"))
    assert proc.returncode == 0, f"seed {seed}: {proc.stderr[-3000:]}"
    assert_same_adapter(run, whole_run)
    assert (run / "summary.csv").read_text().count("\n") == 1 + EPOCHS
    assert (run / "subset.txt").read_bytes() == (whole_run / "subset.txt").read_bytes()
    assert not (run / "checkpoint").exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


# A driver that SIGKILLs the CLI in the middle of writing the checkpoint after epoch 2.
KILL_IN_CHECKPOINT = textwrap.dedent("""
    import os, pathlib, signal, sys
    from wecolora import cli, files
    point, writes = sys.argv[1], []
    real_write_bytes, real_exchange = pathlib.Path.write_bytes, files._exchange

    def write_bytes(self, data):  # checkpoint.py writes its two binary files with Path.write_bytes
        writes.append(self.name)
        if len(writes) == 3 and point == "half-written-file":  # epoch 2's first file
            with open(self, "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write_bytes(self, data)

    def exchange(a, b):  # the swap of the complete new checkpoint with the old one
        if point == "before-swap":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_exchange(a, b)

    pathlib.Path.write_bytes, files._exchange = write_bytes, exchange
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("point", ["half-written-file"])  # other points: test_files.py
def test_a_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(whole_run, teacher_dir, tmp_path, point):
    run = tmp_path / "run"
    args = [sys.executable, "-c", KILL_IN_CHECKPOINT, point, *map(str, distill_args(teacher_dir, run))]
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert '"epoch": 1,' in (run / "checkpoint" / "state.json").read_text()  # epoch 1's, complete
    assert list(run.glob(".checkpoint.*.tmp"))  # the half-made replacement, never taken for a checkpoint
    proc = cli(*distill_args(teacher_dir, run, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_adapter(run, whole_run)
    assert not list(run.glob(".*"))  # the stale temporary was cleaned up


def limit_file_size(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_full_disk_during_export_fails_clearly_and_keeps_the_checkpoint(whole_run, teacher_dir, tmp_path):
    run = tmp_path / "run"
    # Room for the checkpoint files (< 100 KB) but not for the merged student (~180 KB).
    proc = cli(*distill_args(teacher_dir, run), preexec_fn=limit_file_size(128 * 1024))
    assert_user_error(proc, "cannot write")
    assert "free some space or choose another --output" in proc.stderr
    assert f'"epoch": {EPOCHS},' in (run / "checkpoint" / "state.json").read_text()
    assert not (run / "student").exists() and not (run / "adapter").exists()
    assert not list(run.glob(".*"))  # no half-written folder left behind
    proc = cli(*distill_args(teacher_dir, run, "--resume", "auto"))  # space again: finish the run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_adapter(run, whole_run)


# ---------------------------------------------------------------- in-process checks


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(teacher_dir, output, **overrides):
    from wecolora.config import DistillConfig

    settings = dict(teacher=f"local-dir:{teacher_dir}", data="mnist-5k", output=str(output), ratio=0.02, epochs=3,
                    warmup_epochs=1, batch_size=16, accum_steps=1, rank=4, num_workers=0, device="cpu")
    settings.update(overrides)
    return DistillConfig(**settings)


def test_a_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(teacher_dir, tmp_path, monkeypatch,
                                                                            one_thread):
    import wecolora.train.distill as distill_module

    real_loss, real_save = distill_module.feature_loss, distill_module.save_checkpoint
    calls, saved = [], {}

    def loss_turning_nan(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == STEPS_PER_EPOCH + 3:  # epoch 2, step 3
            out["loss"] = out["loss"] * float("nan")
        return out

    def save_and_remember(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        saved.update(snapshot(path))

    monkeypatch.setattr(distill_module, "feature_loss", loss_turning_nan)
    monkeypatch.setattr(distill_module, "save_checkpoint", save_and_remember)
    with pytest.raises(UserError) as err:
        distill_module.distill(config(teacher_dir, tmp_path / "run"))
    message = str(err.value)
    assert "the loss became nan at epoch 2, by step 5 (it is checked every 10 steps)" in message
    assert f"the checkpoint after epoch 1 is kept in {tmp_path / 'run' / 'checkpoint'}" in message
    assert snapshot(tmp_path / "run" / "checkpoint") == saved  # epoch 1's checkpoint, untouched
    assert not (tmp_path / "run" / "student").exists()


def test_damaged_images_are_skipped_with_a_warning_and_counted(teacher_dir, tmp_path, caplog, one_thread):
    from wecolora.train.distill import distill

    data = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(8):
            save_png(data / c / f"{i}.png", digit(i))
    odd_images(data / "c")
    (data / "a" / "truncated.png").write_bytes((data / "a" / "0.png").read_bytes()[:100])
    result = distill(config(teacher_dir, tmp_path / "run", data=str(data), ratio=1.0, epochs=2))
    assert result["unreadable_images"] == ["a/truncated.png"]
    assert "skipping 1 unreadable image(s) of 23: a/truncated.png" in caplog.text
    assert "unreadable_images: 1" in (tmp_path / "run" / "config.yaml").read_text()
    subset = (tmp_path / "run" / "subset.txt").read_text().split()
    assert len(subset) == 22 and "a/truncated.png" not in subset
    assert {s for s in subset if s.startswith("c/")} == {f"c/{p.name}" for p in (data / "c").iterdir()}


def test_unreadable_images_that_empty_a_class_stop_the_run(tmp_path):

    for i in range(20):
        save_png(tmp_path / "a" / f"{i}.png", digit(i))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "0.png").write_bytes(b"broken")
    dataset = open_dataset(str(tmp_path))
    with pytest.raises(UserError, match="class\\(es\\) b keep fewer than 1 image"):
        drop_unreadable(dataset, list(range(len(dataset))), min_per_class=1)


def test_grey_alpha_palette_cmyk_and_16_bit_images_load_as_8_bit_rgb(tmp_path):
    from wecolora.data.datasets import load_rgb

    odd_images(tmp_path)
    grey = digit(99).astype(np.int64)
    for path in sorted(tmp_path.iterdir()):
        image = load_rgb(str(path))
        assert image.mode == "RGB" and image.size == (28, 28), path.name
        pixels = np.asarray(image).astype(np.int64)
        tolerance = 40 if path.suffix == ".jpg" else 1  # JPEG is lossy
        assert np.abs(pixels[..., 0] - grey).mean() < tolerance, path.name


@pytest.mark.parametrize("kind", ["torch-save", "raw-pickle", "model-folder"])
def test_a_malicious_pth_is_refused_and_never_runs(teacher_dir, tmp_path, kind):

    marker = tmp_path / "PWNED"
    payload = {"model": {"w": torch.zeros(1)}, "x": WouldRun(marker)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # the payload really works...
    assert marker.exists()
    marker.unlink()
    if kind == "torch-save":
        evil = tmp_path / "evil.pth"
        evil.write_bytes(buffer.getvalue())
        spec, weights = f"local-dir:{teacher_dir}", str(evil)
    elif kind == "raw-pickle":
        evil = tmp_path / "evil.pth"
        evil.write_bytes(pickle.dumps(WouldRun(marker)))
        spec, weights = f"local-dir:{teacher_dir}", str(evil)
    else:  # a model folder whose only weights are a hostile pytorch_model.bin
        folder = tmp_path / "folder"
        folder.mkdir()
        shutil.copy(Path(teacher_dir) / "config.json", folder / "config.json")
        (folder / "pytorch_model.bin").write_bytes(buffer.getvalue())
        spec, weights = f"local-dir:{folder}", None
    with pytest.raises(UserError, match="refusing to load"):
        load_model(spec, weights=weights)
    assert not marker.exists()  # ...but loading it through wecolora never ran it


def test_plain_pth_and_safetensors_weights_load(teacher_dir, tmp_path):

    state = load_file(str(Path(teacher_dir) / "model.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "nested.pth")
    save_file(state, str(tmp_path / "plain.safetensors"))
    for file in ("nested.pth", "plain.safetensors"):
        model = load_model(f"local-dir:{teacher_dir}", weights=str(tmp_path / file))
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, state[key], msg=key)
        assert model.pretrained_cfg["file"].endswith(file) and "state_dict" not in model.pretrained_cfg


def test_the_torch_free_checks_agree_with_the_modules_they_stand_in_for():
    from wecolora.data import layout
    from wecolora.train import run_folder

    assert layout.BUILTIN_DATASET_NAMES == tuple(BUILTIN_DATASETS)
    assert layout.IMAGE_EXTENSIONS == IMAGE_EXTENSIONS
    assert run_folder.CHECKPOINT_FILES == (WEIGHTS, OPTIMIZER, STATE)
    assert RUN_INFO == "wecolora.json"  # check_distill's marker of a finished run: adapter/wecolora.json


def test_probe_and_knn_skip_and_count_damaged_images_up_to_a_threshold(teacher_dir, tmp_path, caplog, one_thread):

    data = tmp_path / "data"
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(10):
                save_png(data / split / c / f"{i}.png", digit(i + 10 * (c == "b")))
    (data / "train" / "a" / "truncated.png").write_bytes((data / "train" / "a" / "0.png").read_bytes()[:100])
    common = dict(device="cpu", cache_dir=str(tmp_path / "cache"))
    result = probe(f"local-dir:{teacher_dir}", str(data), str(tmp_path / "probe"), epochs=2, **common)
    assert (result["n_train"], result["unreadable_train"], result["unreadable_test"]) == (20, 1, 0)
    written = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert written["unreadable_images"] == ["train/a/truncated.png"] and written["unreadable_train"] == 1
    assert "skipping 1 unreadable image(s) of 21: train/a/truncated.png" in caplog.text
    neighbours = knn(f"local-dir:{teacher_dir}", str(data), str(tmp_path / "knn"), k=3, **common)
    assert neighbours["n_train"] == 20 and neighbours["unreadable_train"] == 1
    # Beyond the threshold (a setting, not a constant): one line, exit 2, no results.json.
    proc = cli("probe", "--model", f"local-dir:{teacher_dir}", "--data", str(data), "--output",
               str(tmp_path / "strict"), "--max-unreadable", "0.01", "--device", "cpu")
    assert_user_error(proc, "1 of the 21 chosen images cannot be read")
    assert "--max-unreadable" in proc.stderr and not (tmp_path / "strict").exists()


def test_an_image_damaged_during_a_run_stops_with_one_line(tmp_path):
    """A file that breaks after the start-up check: the loader worker's error reaches the user as one line."""

    for i in range(4):
        save_png(tmp_path / "a" / f"{i}.png", digit(i))
    dataset = open_dataset(str(tmp_path))
    (tmp_path / "a" / "2.png").write_bytes(b"broken")  # damaged after the dataset was listed
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1)
    with pytest.raises(UserError) as err:
        next(iter(loader))
    line = one_line(err.value)
    assert "\n" not in line and line.startswith(f"image {tmp_path / 'a' / '2.png'} cannot be read any more")
    assert "--resume auto" in line


def test_the_readability_check_is_remembered_per_file_listing(tmp_path, monkeypatch):

    monkeypatch.setenv("WECOLORA_CACHE_DIR", str(tmp_path / "cache"))
    for i in range(20):
        save_png(tmp_path / "d" / "a" / f"{i}.png", digit(i))
    (tmp_path / "d" / "a" / "bad.png").write_bytes(b"broken")
    dataset = open_dataset(str(tmp_path / "d"))
    everything = list(range(len(dataset)))
    first = drop_unreadable(dataset, everything)
    decoded = []
    real_decodes = _decodes
    import wecolora.data.subset as subset_module

    monkeypatch.setattr(subset_module, "_decodes",
                        lambda reader, p: decoded.append(reader.name(p)) or real_decodes(reader, p))
    assert drop_unreadable(dataset, everything) == first and first[1] == ["a/bad.png"]
    assert decoded == []  # the unchanged listing's verdict was read back: nothing decoded
    save_png(tmp_path / "d" / "a" / "bad.png", digit(0))  # repaired: the listing changed, so it is decoded again
    assert drop_unreadable(dataset, everything) == (everything, [])
    assert len(decoded) == len(everything)
