"""Several processes on the CPU (gloo), as torchrun starts them: the same results as one process.

Most tests fork their processes (they inherit the imported modules and start in about a second), give
each one thread and torchrun's environment variables, and compare what the processes return. The
single-process references run the same way, so every compared number comes from one thread.
"""
import json
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import wecolora.train.distill as distill_module
import wecolora.train.setup as training_module
from wecolora.config import DistillConfig
from wecolora.evaluation.probe import probe
from wecolora.train.checkpoint import trainable_state
from wecolora.train.pretrain import PretrainConfig, pretrain

from conftest import interrupted_after_first_checkpoint

pytestmark = pytest.mark.timeout(240)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, world: int, port: int, fn, args, queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
        from accelerate.state import AcceleratorState, GradientState

        # The fork copied the parent's accelerate state (one process); start from none, as torchrun would.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        queue.put((rank, None, pickle.dumps(fn(*args))))  # pickled here: no shared-memory tensors
    except BaseException:
        queue.put((rank, traceback.format_exc(), None))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os._exit(0)  # skip pytest's exit handlers, inherited by the fork


def run_processes(world: int, fn, *args, timeout: float = 180) -> list:
    """``fn(*args)`` on ``world`` forked processes joined like torchrun's; returns each rank's result."""
    context = multiprocessing.get_context("fork")
    queue, port = context.SimpleQueue(), free_port()
    processes = [context.Process(target=_process, args=(rank, world, port, fn, args, queue)) for rank in range(world)]
    for p in processes:
        p.start()
    results = {}
    try:
        while len(results) < world:
            if queue.empty():  # a process killed by a signal never answers; the others would wait for it
                crashed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if crashed:
                    raise AssertionError(f"a process of {world} died with exit code {crashed[0]}")
                time.sleep(0.05)
                continue
            rank, error, value = queue.get()
            if error:
                raise AssertionError(f"rank {rank} of {world} failed:\n{error}")
            results[rank] = pickle.loads(value)
    finally:
        for p in processes:
            p.join(timeout)
            if p.is_alive():
                p.kill()
    return [results[rank] for rank in range(world)]


def distill_config(teacher_dir, output, **overrides) -> DistillConfig:
    # 80 images (2% of the 4,000 training digits): 5 global batches of 16, so every step's batch is full.
    settings = dict(teacher=f"local-dir:{teacher_dir}", data="mnist-5k", output=str(output), ratio=0.02, epochs=3,
                    warmup_epochs=1, batch_size=16, accum_steps=2, blr=5e-3, rank=4, num_workers=0, device="cpu",
                    teacher_cache=False)
    settings.update(overrides)
    return DistillConfig(**settings)


class Stopped(Exception):
    pass


def distill_in_process(config: DistillConfig, stop_after_epoch: int | None = None) -> dict:
    """Distil; return this process's trainable student weights and per-epoch losses.

    ``stop_after_epoch`` interrupts every process once that epoch's checkpoint is written.
    """
    built = {}
    real_build = training_module.student_from_plan

    def build_and_keep(*args, **kwargs):
        built["student"] = real_build(*args, **kwargs)
        return built["student"]

    training_module.student_from_plan = build_and_keep  # a forked process: the patch dies with it
    if stop_after_epoch is not None:
        from accelerate import Accelerator

        real_wait = Accelerator.wait_for_everyone
        state_file = Path(config.output) / "checkpoint" / "state.json"

        def wait_then_stop(self):
            real_wait(self)  # after the barrier every process sees the checkpoint the first one wrote
            if state_file.is_file() and json.loads(state_file.read_text())["progress"]["epoch"] == stop_after_epoch:
                raise Stopped

        Accelerator.wait_for_everyone = wait_then_stop
    try:
        result = distill_module.distill(config)
    except Stopped:
        return {}
    return {"weights": trainable_state(built["student"]), "losses": [row["loss"] for row in result["epochs"]]}


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def two_and_one(teacher_dir, tmp_path_factory):
    """The same run on 2 processes x batch 8 and on 1 process x batch 16 (accumulation 2: global batch 32)."""
    root = tmp_path_factory.mktemp("ddp")
    two = run_processes(2, distill_in_process, distill_config(teacher_dir, root / "two", batch_size=8))
    one = run_processes(1, distill_in_process, distill_config(teacher_dir, root / "one", batch_size=16))
    return root, two, one[0]


def test_two_processes_hold_identical_adapters_equal_to_one_process_with_the_same_global_batch(two_and_one):
    root, (rank0, rank1), one = two_and_one
    assert_same_weights(rank0["weights"], rank1["weights"], atol=0)  # DDP: every rank applies the same update
    assert_same_weights(rank0["weights"], one["weights"], atol=1e-5)
    assert rank0["losses"] == rank1["losses"]  # reduced across ranks
    assert rank0["losses"] == pytest.approx(one["losses"], abs=1e-5)
    resolved = yaml.safe_load((root / "two" / "config.yaml").read_text())["resolved"]
    assert (resolved["world_size"], resolved["effective_batch"]) == (2, 32)
    assert resolved["lr"] == pytest.approx(5e-3 * 32 / 256)
    exported = load_file(str(root / "two" / "adapter" / "adapter_model.safetensors"))
    assert exported and (root / "two" / "summary.csv").read_text().count("\n") == 1 + 3


def test_a_run_resumes_on_another_number_of_processes(two_and_one, teacher_dir, tmp_path):
    _, (uninterrupted, _), _ = two_and_one
    config = distill_config(teacher_dir, tmp_path / "run", batch_size=8)
    run_processes(2, distill_in_process, config, 1)
    assert (tmp_path / "run" / "checkpoint").is_dir()
    resumed = distill_config(teacher_dir, tmp_path / "run", batch_size=16, resume="auto")  # the same global batch
    (result,) = run_processes(1, distill_in_process, resumed)
    assert_same_weights(result["weights"], uninterrupted["weights"], atol=1e-5)


def test_the_teacher_cache_is_written_once_by_two_processes_and_read_by_any_number(teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    cold = run_processes(2, distill_in_process, distill_config(teacher_dir, tmp_path / "cold", batch_size=8, epochs=2,
                                                                teacher_cache=True, teacher_cache_dir=str(cache)))
    (entry,) = cache.iterdir()
    assert sorted(f.name for f in entry.iterdir()) == ["meta.json", "view0000.tokens.npy", "view0001.tokens.npy"]
    warm_one = run_processes(1, distill_in_process, distill_config(teacher_dir, tmp_path / "one", batch_size=16, epochs=2,
                                                                    teacher_cache=True, teacher_cache_dir=str(cache)))
    warm_two = run_processes(2, distill_in_process, distill_config(teacher_dir, tmp_path / "two", batch_size=8, epochs=2,
                                                                    teacher_cache=True, teacher_cache_dir=str(cache)))
    assert_same_weights(cold[0]["weights"], cold[1]["weights"], atol=0)
    assert_same_weights(cold[0]["weights"], warm_one[0]["weights"], atol=1e-5)
    assert_same_weights(cold[0]["weights"], warm_two[1]["weights"], atol=1e-5)


def test_only_the_student_is_trained_in_every_mode_on_two_processes(teacher_dir, tmp_path):
    # weco-kd trains every student weight, and DDP fails on any that gets no gradient (head, final norm).
    config = distill_config(teacher_dir, tmp_path / "kd", mode="weco-kd", rank=None, epochs=2, batch_size=8)
    rank0, rank1 = run_processes(2, distill_in_process, config)
    assert_same_weights(rank0["weights"], rank1["weights"], atol=0)
    assert not any(name.startswith(("head.", "norm.")) for name in rank0["weights"])
    assert timm.create_model(f"local-dir:{tmp_path / 'kd' / 'student'}", pretrained=True)


def test_resuming_with_another_effective_batch_restarts_the_schedule_at_the_same_epoch(teacher_dir, tmp_path, monkeypatch):
    with interrupted_after_first_checkpoint(monkeypatch, distill_module):
        distill_module.distill(distill_config(teacher_dir, tmp_path / "run", batch_size=16))  # 3 updates an epoch
    config = distill_config(teacher_dir, tmp_path / "run", batch_size=8, resume="auto")  # 5 updates an epoch
    rows = distill_module.distill(config)["epochs"]
    assert [row["updates"] for row in rows] == [3, 10, 15]
    # Epoch 2 ends at update 10 of 15 (5 of warmup): halfway down the cosine of this run's lr rule.
    assert rows[1]["lr"] == pytest.approx(0.5 * config.peak_lr(), rel=1e-6)
    assert rows[2]["lr"] == pytest.approx(0.0, abs=1e-12)


def probe_in_process(model: str, output: Path, cache: Path, protocol: str) -> dict:
    options = dict(epochs=3, batch_size=128, val_fraction=0.1, device="cpu", cache_dir=str(cache),
                   extract_batch_size=512)
    if protocol == "mae":
        options.update(train_per_class=20, epochs=2, batch_size=32)
    return probe(model, "mnist-5k", str(output), protocol=protocol, **options)


@pytest.mark.parametrize("protocol", ["cached", "mae"])
def test_a_probe_on_two_processes_scores_as_on_one(teacher_dir, tmp_path, protocol):
    model = f"local-dir:{teacher_dir}"
    two = run_processes(2, probe_in_process, model, tmp_path / "two", tmp_path / "cache2", protocol)
    (one,) = run_processes(1, probe_in_process, model, tmp_path / "one", tmp_path / "cache1", protocol)
    assert two[0]["top1"] == two[1]["top1"] == one["top1"]
    assert two[0]["top5"] == one["top5"] and two[0]["val_top1"] == one["val_top1"]
    assert (two[0]["n_train"], two[0]["n_test"]) == (one["n_train"], one["n_test"])
    written = json.loads((tmp_path / "two" / "results.json").read_text())
    assert written["processes"] == 2 and written["top1"] == one["top1"]
    if protocol == "cached":
        assert len(list((tmp_path / "cache2").glob("*.safetensors"))) == 2  # train and test, written once
        again = run_processes(2, probe_in_process, model, tmp_path / "again", tmp_path / "cache2", protocol)
        assert again[0]["features_cached"] and again[1]["features_cached"] and again[0]["top1"] == one["top1"]


def pretrain_in_process(output: Path) -> dict:
    config = PretrainConfig(data="mnist-5k", output=str(output), depth=2, embed_dim=32, num_heads=2, epochs=2,
                            warmup_epochs=1, batch_size=128, eval_every=1, num_workers=0, device="cpu")
    return pretrain(config)


def test_pretrain_on_two_processes_completes_its_schedule(tmp_path):
    rank0, rank1 = run_processes(2, pretrain_in_process, tmp_path / "teacher")
    scores = [[(row["loss"], row["test_top1"], row["lr"]) for row in rank["epochs"]] for rank in (rank0, rank1)]
    assert scores[0] == scores[1]  # the loss reduced and the accuracy gathered across processes
    assert rank0["epochs"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # counted in per-process updates
    model = timm.create_model(f"local-dir:{tmp_path / 'teacher' / 'model'}", pretrained=True)
    assert len(model.blocks) == 2


def mae_pretrain_in_process(output: Path) -> dict:
    import wecolora.train.pretrain as pretrain_module

    # The monitor reports a checksum of this process's encoder instead: equal on both processes only
    # if their gradients were averaged (each process trains on its own share of every batch).
    pretrain_module.knn_top1 = lambda model, *args: float(sum(p.double().sum() for p in model.parameters()))
    config = PretrainConfig(data="mnist-5k", output=str(output), objective="mae", depth=1, embed_dim=32, num_heads=2,
                            decoder_dim=32, decoder_depth=1, epochs=1, warmup_epochs=0, batch_size=256,
                            num_workers=0, device="cpu")
    return pretrain(config)


def test_mae_pretraining_on_two_processes_keeps_one_encoder(tmp_path):
    rank0, rank1 = run_processes(2, mae_pretrain_in_process, tmp_path / "teacher-mae")
    assert rank0["knn_top1"] == rank1["knn_top1"]  # the encoders' checksums
    assert rank0["epochs"][0]["loss"] == rank1["epochs"][0]["loss"]  # reduced across processes
    model = timm.create_model(f"local-dir:{tmp_path / 'teacher-mae' / 'model'}", pretrained=True)
    assert model.num_classes == 0 and len(model.blocks) == 1


def test_torchrun_distills_on_two_cpu_processes_into_a_student_timm_loads(teacher_dir, tmp_path):
    output = tmp_path / "run"
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
               "-m", "wecolora", "distill", "--teacher", f"local-dir:{teacher_dir}", "--data", "mnist-5k",
               "--output", str(output), "--ratio", "0.02", "--epochs", "2", "--warmup-epochs", "1",
               "--batch-size", "8", "--accum-steps", "2", "--rank", "4", "--device", "cpu", "--num-workers", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=200, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("done: ") == 1, done.stdout  # printed by the first process only
    assert done.stderr.count("effective batch 32 = 8 x 2 accumulation x 2 processes; lr") == 1, done.stderr
    student = timm.create_model(f"local-dir:{output / 'student'}", pretrained=True).eval()
    assert len(student.blocks) == 3
    with torch.no_grad():
        assert student(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def distill_with_a_search_that_differs_by_rank(config: DistillConfig) -> list[int]:
    """Distil with a searched keep whose result differs on ranks other than 0; return the kept blocks used."""
    import dataclasses


    real_choose = distill_module.choose_blocks

    def choose(*args, **kwargs):
        choice = real_choose(*args, **kwargs)
        if os.environ["RANK"] != "0":  # as if another GPU broke a near-tie the other way
            other = (1, 3, 5) if choice.kept != (1, 3, 5) else (0, 2, 4)
            choice = dataclasses.replace(choice, kept=other)
        return choice

    distill_module.choose_blocks = choose  # a forked process: the patch dies with it
    return distill_module.distill(config)["kept_blocks"]


def test_every_process_trains_the_blocks_the_first_process_chose(teacher_dir, tmp_path):
    config = distill_config(teacher_dir, tmp_path / "greedy", keep="greedy", keep_images=32, epochs=1,
                            warmup_epochs=0, batch_size=8)
    rank0, rank1 = run_processes(2, distill_with_a_search_that_differs_by_rank, config)
    assert rank0 == rank1
    resolved = yaml.safe_load((tmp_path / "greedy" / "config.yaml").read_text())["resolved"]
    assert resolved["kept_blocks"] == rank0 == resolved["block_search"]["candidates"]["greedy"]["kept"]


def test_a_narrow_student_with_the_projection_trains_on_two_processes_as_on_one(teacher_dir, tmp_path):
    """The width projector is part of the module DDP wraps: every rank holds the same adapters, equal to one
    process's with the same global batch."""
    narrow = dict(embed_dim=16, mlp_hidden=64, width_loss="projection", width_ranking="uniform", epochs=2)
    two = run_processes(2, distill_in_process, distill_config(teacher_dir, tmp_path / "two", batch_size=8, **narrow))
    (one,) = run_processes(1, distill_in_process, distill_config(teacher_dir, tmp_path / "one", batch_size=16, **narrow))
    assert_same_weights(two[0]["weights"], two[1]["weights"], atol=0)
    assert_same_weights(two[0]["weights"], one["weights"], atol=1e-5)
    plain = timm.create_model(f"local-dir:{tmp_path / 'two' / 'student'}", pretrained=True)
    assert (plain.embed_dim, plain.blocks[0].mlp.fc1.out_features) == (16, 64)


def distill_with_a_width_ranking_that_differs_by_rank(config: DistillConfig) -> dict:
    """Distil a narrower student whose activation ranking differs on ranks other than 0; return the choice used."""
    import dataclasses

    import wecolora.method.plan as plan_module

    real_choose = plan_module.choose_width

    def choose(*args, **kwargs):
        choice = real_choose(*args, **kwargs)
        if os.environ["RANK"] != "0":  # as if another GPU broke a near-tie the other way
            choice = dataclasses.replace(choice, channels=tuple(range(len(choice.channels))))
        return choice

    plan_module.choose_width = choose  # a forked process: the patch dies with it
    return distill_module.distill(config)["width_selection"]


def test_every_process_trains_the_width_the_first_process_chose(teacher_dir, tmp_path):
    config = distill_config(teacher_dir, tmp_path / "narrow", embed_dim=16, keep_images=32, epochs=1, warmup_epochs=0,
                            batch_size=8)
    rank0, rank1 = run_processes(2, distill_with_a_width_ranking_that_differs_by_rank, config)
    assert rank0 == rank1 and rank0["ranking"] == "activation"
    resolved = yaml.safe_load((tmp_path / "narrow" / "config.yaml").read_text())["resolved"]
    assert resolved["width_selection"] == rank0


def distill_with_a_budget_measured_differently_by_rank(config: DistillConfig) -> tuple:
    """api.distill with a budget whose measurement would choose another shape on ranks other than 0."""
    from test_planner import flop_latency
    from wecolora import api
    from wecolora.bench import planner

    def measure(*args):
        rows = flop_latency(*args)
        if os.environ["RANK"] != "0":  # a slower process: everything but the teacher 10x faster
            rows = [row if row.get("teacher") else {**row, "latency_ms": row["latency_ms"] / 10} for row in rows]
        return rows

    planner.measure = measure  # a forked process: the patch dies with it
    result = api.distill(config)
    return result["shape_budget"]["chosen"]["embed_dim"], result["kept_blocks"], result.get("embed_dim")


def test_every_process_trains_the_shape_the_first_process_planned(teacher_dir, tmp_path):
    config = distill_config(teacher_dir, tmp_path / "budget", speedup=2.5, width_ranking="uniform", epochs=1,
                            warmup_epochs=0, batch_size=8)
    rank0, rank1 = run_processes(2, distill_with_a_budget_measured_differently_by_rank, config)
    assert rank0 == rank1
    assert json.loads((tmp_path / "budget" / "plan.json").read_text())["chosen"]["embed_dim"] == rank0[0]
