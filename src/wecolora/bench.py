"""``wecolora bench``: distillation and inference throughput on this machine, against the paper's code design.

Everything is measured in ONE process, in interleaved rounds (reference, then each wecolora variant, then
again), so that a busy spell of a shared machine hits every line alike; each line reports its best round
(other processes only ever slow a round down) and a ratio is a ratio of best rounds. Measured:

1. distillation images/s (r=2, all six adapters): the reference design written here (fp32, the teacher
   run at every step, one unfused low-rank module per projection added on top of the frozen fused qkv
   and the other linears, as the authors' code does) against wecolora's own training step
   (:func:`wecolora.distill.train_one_epoch` with the lean adapter path and the teacher cache, cold:
   teacher run and tokens stored; warm: tokens read back; both cut their views from the image store on
   the device), in fp32 and, where the hardware has fast bf16 (CUDA, or a CPU with AVX-512 BF16 / AMX),
   in bf16 autocast;
2. inference images/s of the teacher, of the unmerged adapter students and of the merged students
   (r = 2 and 3), fp32;
3. peak memory of each (tensor allocations during one step or forward: the profiler on the CPU,
   ``max_memory_allocated`` on CUDA);
4. the training cost of an ablation grid of six students (wecolora, lora-qv, weco-kd at r = 2 and 3)
   with one shared teacher cache (the first student fills it) against the same grid without it.

The CLI prints the table (or ``--json``: one object) and writes ``benchmarks/results/bench-*.json``.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import adapters, data, image_store, losses, teacher_cache, vit
from .errors import UserError
from .student import build_student, plan_student, student_from_plan

_logger = logging.getLogger(__name__)

GRID = [("wecolora", 2), ("wecolora", 3), ("lora-qv", 2), ("lora-qv", 3), ("weco-kd", 2), ("weco-kd", 3)]
TARGETS = {"distill_speedup_cold": 1.5, "distill_speedup_warm": 2.5, "infer_speedup_r2": 1.85,
           "infer_speedup_r3": 2.6, "grid_cost_ratio": 0.5}


@dataclass
class BenchConfig:
    """What ``wecolora bench`` measures on; ``quick`` shrinks the data and the repetitions."""
    teacher: str = "bundled"
    data: str = "fashion-mnist"
    device: str = "auto"
    precision: str = "auto"  # auto: fp32 and, where the hardware has fast bf16, bf16 too; or fp32 / bf16
    batch_size: int = 128
    images: int | None = None  # distillation images per epoch (default 2048, quick 512)
    rounds: int | None = None  # interleaved repetitions (default 5, quick 3)
    num_workers: int = 0
    quick: bool = False
    output_dir: str | None = "benchmarks/results"

    def __post_init__(self):
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision {self.precision!r} is invalid: expected auto, fp32 or bf16")
        for name in ("batch_size", "images", "rounds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} {value} is invalid: expected an integer >= 1")
        self.images = self.images or (512 if self.quick else 2048)
        self.rounds = self.rounds or (3 if self.quick else 5)


# ---------------------------------------------------------------------------------------------
# The reference design


class ReferenceLoRA(nn.Module):
    """The authors' layout: a frozen Linear plus its own unfused ``B(A(x))`` (two nn.Linear, no bias)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.a = nn.Linear(base.in_features, rank, bias=False)  # kaiming-uniform, as nn.Linear
        self.b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.b.weight)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


class ReferenceLoRAQKV(nn.Module):
    """The authors' qkv: the frozen fused Linear, then q, k, v updates added in place to their slices."""

    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__()
        self.qkv, self.dim = qkv, qkv.in_features
        self.a = nn.ModuleList(nn.Linear(self.dim, rank, bias=False) for _ in range(3))
        self.b = nn.ModuleList(nn.Linear(rank, self.dim, bias=False) for _ in range(3))
        for b in self.b:
            nn.init.zeros_(b.weight)

    def forward(self, x):
        qkv = self.qkv(x)  # [B, N, 3D]
        for i, (a, b) in enumerate(zip(self.a, self.b)):
            qkv[:, :, i * self.dim:(i + 1) * self.dim] += b(a(x))
        return qkv


def reference_student(teacher: nn.Module, reduction: int, rank: int) -> nn.Module:
    """The weight-copied student with the reference design's adapters on q, k, v, proj, fc1 and fc2."""
    student = build_student(teacher, reduction, mode="weco-kd").requires_grad_(False)
    for block in student.blocks:
        block.attn.qkv = ReferenceLoRAQKV(block.attn.qkv, rank)
        block.attn.proj = ReferenceLoRA(block.attn.proj, rank)
        block.mlp.fc1 = ReferenceLoRA(block.mlp.fc1, rank)
        block.mlp.fc2 = ReferenceLoRA(block.mlp.fc2, rank)
    return student


def reference_epoch(student, teacher, loader, optimizer, device, teacher_blocks) -> float:
    """One epoch of the reference loop (fp32, teacher at every step); returns images/s."""
    student.train()
    seen, start = 0, time.perf_counter()
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        with torch.no_grad():
            targets = vit.last_block_tokens(teacher, images, teacher_blocks)
        predictions = vit.last_block_tokens(student, images)
        loss = losses.feature_loss(predictions, targets, "l1")["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += images.shape[0]
    _sync(device)
    return seen / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# wecolora's step, driven without accelerate (one process, no accumulation: the same calls)


class LocalAccelerator:
    """The part of ``accelerate.Accelerator`` that ``train_one_epoch`` uses, for one process and any precision.

    accelerate keeps one mixed-precision setting per process; the bench needs fp32 and bf16 side by side.
    """

    def __init__(self, device: torch.device, precision: str):
        self.device, self.precision = device, precision
        self.num_processes, self.sync_gradients, self.is_main_process = 1, True, True

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def accumulate(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def reduce(self, tensor, reduction="mean"):
        return tensor


@dataclass
class Trainer:
    """A student ready to train with wecolora's loop at one precision."""
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    accelerator: LocalAccelerator
    student_blocks: list[int]
    teacher_blocks: list[int]
    norm: bool


def make_trainer(teacher: nn.Module, *, mode: str, reduction: int, rank: int, precision: str, device: torch.device,
                 updates_per_epoch: int) -> Trainer:
    from .distill import freeze_unreached, make_optimizer, training_view
    from .engine import make_scheduler

    plan = plan_student(teacher, reduction, "first", mode, rank)
    student = student_from_plan(teacher, plan)
    student_blocks, teacher_blocks, norm = losses.matched_blocks("last", list(plan.segment_ends))
    freeze_unreached(student, norm)
    model = training_view(student, student_blocks, norm, device=device, precision=precision).to(device)
    optimizer = make_optimizer(student, 1e-4, 0.05, device)
    scheduler = make_scheduler(optimizer, 10_000, 0, updates_per_epoch)
    return Trainer(f"{mode} r={reduction}", model, optimizer, scheduler, LocalAccelerator(device, precision),
                   student_blocks, teacher_blocks, norm)


@contextlib.contextmanager
def _teacher_attention(teacher: nn.Module, accelerator: LocalAccelerator):
    """The teacher's attention as distill sets it: plain matmuls under bf16 on the CPU, else as it was."""
    from .distill import plain_attention

    modules = [m for m in teacher.modules() if hasattr(m, "fused_attn")]
    before = [m.fused_attn for m in modules]
    if plain_attention(accelerator.device, accelerator.precision):
        vit.use_fused_attention([teacher], False)
    try:
        yield
    finally:
        for module, fused in zip(modules, before):
            module.fused_attn = fused


def wecolora_epoch(trainer: Trainer, teacher, loader, *, recipe, writer=None) -> float:
    """One epoch of :func:`wecolora.distill.train_one_epoch`; returns images/s."""
    from tqdm.auto import tqdm

    from .distill import train_one_epoch

    with tqdm(disable=True) as bar, _teacher_attention(teacher, trainer.accelerator):
        metrics, _ = train_one_epoch(trainer.model, teacher, loader, trainer.optimizer, trainer.scheduler,
                                     trainer.accelerator, bar, teacher_blocks=trainer.teacher_blocks, norm=trainer.norm,
                                     loss_kind="l1", updates=0, epoch=0, recipe=recipe, writer=writer)
    _sync(trainer.accelerator.device)
    if writer is not None and not writer.commit():
        raise RuntimeError("the teacher cache view was not complete after an epoch")
    return metrics["images_per_s"]


# ---------------------------------------------------------------------------------------------
# Helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here: CUDA with bf16, or a CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & set(_cpu_flags()))


def _cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    return []


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = set(_cpu_flags())
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"}),
            "platform": platform.platform(), "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    from .engine import versions

    info.update(versions())
    return info


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak tensor memory allocated while ``fn`` runs (MB), above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:  # the trace's memory events carry the running total allocated
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    totals = [e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]" and "args" in e]
    return max(totals, default=0) / 2**20


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop lines (written straight to file descriptor 2)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _time_calls(fn, device: torch.device, calls: int) -> float:
    """Seconds per call of ``fn``."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def _best(rates: list[float]) -> float:
    """The best of the rounds: other processes can only slow a round down, never speed it up."""
    return max(rates)


# ---------------------------------------------------------------------------------------------
# The benchmark


def run_bench(config: BenchConfig, progress=None) -> dict:
    """Run every measurement; returns the results (also written as JSON under ``config.output_dir``).

    Example:
        >>> result = run_bench(BenchConfig(quick=True))   # doctest: +SKIP
        >>> result["distill_speedup_warm"]                # doctest: +SKIP
    """
    from .features import resolve_device

    started = time.perf_counter()
    report = progress or (lambda message: _logger.info("%s", message))

    def say(message: str) -> None:
        report(f"[{time.perf_counter() - started:5.1f} s] {message}")

    device = resolve_device(config.device)
    torch.manual_seed(0)
    teacher = vit.load_model(config.teacher).requires_grad_(False).to(device)
    rank = plan_student(teacher, 2, mode="wecolora").rank  # the default rank of this teacher
    precisions = ["fp32", "bf16"] if config.precision == "auto" and fast_bf16(device) else \
        (["fp32"] if config.precision == "auto" else [config.precision])
    if "bf16" in precisions and device.type == "cpu" and not fast_bf16(device):
        _logger.warning("this CPU has neither AVX-512 BF16 nor AMX: bf16 will be slow")

    # Data: a few-shot subset, the paper's augmentation (mnist-5k when Fashion-MNIST is not installed).
    spec = config.data
    try:
        dataset = data.open_dataset(spec, "train")
    except UserError:
        if spec != "fashion-mnist":
            raise
        spec = "mnist-5k"
        dataset = data.open_dataset(spec, "train")
    per_class = max(1, math.ceil(config.images / len(dataset.classes)))
    indices = data.few_shot_indices(dataset.targets, per_class=per_class, seed=0)[:config.images]
    transform = data.train_transform(teacher)
    recipe = image_store.ViewRecipe.for_model(teacher)
    n, batch = len(indices), config.batch_size
    updates_per_epoch = math.ceil(n / batch)
    generator = torch.Generator()
    store = image_store.open_store(dataset, indices, bound=recipe.bound, num_workers=config.num_workers)

    def view_loader(view: int, cache=None) -> DataLoader:
        """View ``view`` of the subset cut from the image store, with its cached tokens when ``cache`` is given."""
        generator.manual_seed(view)
        batches = image_store.StoreBatches(store, indices, recipe, seed=0, view=view, cache=cache)
        return image_store.store_loader(batches, batch, generator, num_workers=config.num_workers,
                                        pin_memory=device.type == "cuda")

    reference_data = data.open_dataset(spec, "train", transform=transform)  # the plain per-image pipeline
    reference_loader = DataLoader(Subset(reference_data, indices), batch_size=batch, shuffle=True,
                                  num_workers=config.num_workers)
    result = {"config": asdict(config), "machine": machine(device), "teacher": vit.architecture(teacher),
              "teacher_blocks": len(teacher.blocks), "width": teacher.embed_dim, "rank": rank, "images": n,
              "batch_size": batch, "precisions": precisions, "data": spec}

    with tempfile.TemporaryDirectory(prefix="wecolora-bench-") as cache_root:
        caches = {p: teacher_cache.TeacherCache.open(
            cache_root, teacher=teacher, dataset=dataset, indices=indices, transform=recipe, seed=0,
            teacher_blocks=[len(teacher.blocks) - 1], norm=False, precision=p) for p in precisions}
        result["distill"] = _bench_distill(config, teacher, rank, precisions, caches, recipe, view_loader,
                                           reference_loader, device, n, batch, updates_per_epoch, say)
        result["grid"] = _bench_grid(config, teacher, rank, precisions[-1], cache_root, dataset, indices, recipe,
                                     view_loader, device, n, updates_per_epoch, say)
    result["inference"] = _bench_inference(config, teacher, rank, device, batch, say)

    best = precisions[-1]
    d, inf = result["distill"], result["inference"]
    result.update({
        "distill_precision": best,
        "distill_speedup_cold": d[f"{best}_cold"]["speedup"],
        "distill_speedup_warm": d[f"{best}_warm"]["speedup"],
        "distill_speedup_cold_fp32": d["fp32_cold"]["speedup"] if "fp32_cold" in d else None,
        "distill_speedup_warm_fp32": d["fp32_warm"]["speedup"] if "fp32_warm" in d else None,
        "infer_speedup_r2": inf["merged_r2"]["speedup"],
        "infer_speedup_r3": inf["merged_r3"]["speedup"],
        "grid_cost_ratio": result["grid"]["cost_ratio"],
    })
    result["targets"] = {k: {"target": v, "reached": (result[k] <= v) if k == "grid_cost_ratio" else (result[k] >= v)}
                         for k, v in TARGETS.items()}
    if config.output_dir:
        folder = Path(config.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = folder / f"bench-{stamp}{'-quick' if config.quick else ''}.json"
        from .files import atomic_write_text

        atomic_write_text(path, json.dumps(result, indent=1))
        result["written_to"] = str(path)
    return result


def _bench_distill(config, teacher, rank, precisions, caches, recipe, view_loader, reference_loader, device, n, batch,
                   updates_per_epoch, say) -> dict:
    from torch.optim import AdamW

    last = [len(teacher.blocks) - 1]
    reference = reference_student(teacher, 2, rank).to(device)
    ref_optimizer = AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05,
                          betas=(0.9, 0.95))
    trainers = {p: make_trainer(teacher, mode="wecolora", reduction=2, rank=rank, precision=p, device=device,
                                updates_per_epoch=updates_per_epoch) for p in precisions}

    def cold(p: int, view: int) -> float:
        return wecolora_epoch(trainers[p], teacher, view_loader(view), recipe=recipe, writer=caches[p].writer(view, n))

    def warm(p: int) -> float:
        return wecolora_epoch(trainers[p], teacher, view_loader(0, caches[p]), recipe=recipe)

    say(f"distillation: warm-up ({n} images, batch {batch}, {', '.join(precisions)})")
    reference_epoch(reference, teacher, reference_loader, ref_optimizer, device, last)
    for p in precisions:
        cold(p, 0)  # fills view 0: the view the warm epochs read
        warm(p)
    rates: dict[str, list[float]] = {"reference": []}
    for r in range(config.rounds):
        say(f"distillation: round {r + 1}/{config.rounds}")
        rates["reference"].append(reference_epoch(reference, teacher, reference_loader, ref_optimizer, device, last))
        for p in precisions:
            rates.setdefault(f"{p}_cold", []).append(cold(p, r + 1))  # a view never computed before: cold
            rates.setdefault(f"{p}_warm", []).append(warm(p))

    say("distillation: peak memory")
    batch_images, _ = next(iter(reference_loader))
    peaks = {"reference": peak_memory_mb(lambda: _one_reference_step(reference, teacher, batch_images.to(device),
                                                                      ref_optimizer, last), device)}
    for p in precisions:
        cold_batch = [next(iter(view_loader(config.rounds + 1)))]
        peaks[f"{p}_cold"] = peak_memory_mb(lambda: wecolora_epoch(
            trainers[p], teacher, cold_batch, recipe=recipe,
            writer=_PartialWriter(caches[p].writer(config.rounds + 1, n))), device)
        warm_batch = [next(iter(view_loader(0, caches[p])))]
        peaks[f"{p}_warm"] = peak_memory_mb(lambda: wecolora_epoch(trainers[p], teacher, warm_batch, recipe=recipe),
                                            device)

    out = {}
    for name, values in rates.items():
        out[name] = {"images_per_s": _best(values), "rounds": values,
                     "speedup": _best(values) / _best(rates["reference"]), "peak_mb": peaks[name]}
    return out


class _PartialWriter:
    """A view writer for a one-batch measurement: stores nothing on commit."""

    def __init__(self, writer):
        self.writer = writer

    def write(self, *args):
        return self.writer.write(*args)

    def commit(self):
        self.writer.abort()
        return True


def _one_reference_step(student, teacher, images, optimizer, teacher_blocks) -> None:
    with torch.no_grad():
        targets = vit.last_block_tokens(teacher, images, teacher_blocks)
    loss = losses.feature_loss(vit.last_block_tokens(student, images), targets, "l1")["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _bench_grid(config, teacher, rank, precision, cache_root, dataset, indices, recipe, view_loader, device,
                n, updates_per_epoch, say) -> dict:
    """Per-epoch training seconds of the six students with and without one shared cache."""
    cache = teacher_cache.TeacherCache.open(Path(cache_root) / "grid", teacher=teacher, dataset=dataset,
                                            indices=indices, transform=recipe, seed=0,
                                            teacher_blocks=[len(teacher.blocks) - 1], norm=False, precision=precision)
    trainers = [make_trainer(teacher, mode=mode, reduction=reduction, rank=rank, precision=precision, device=device,
                             updates_per_epoch=updates_per_epoch) for mode, reduction in GRID]
    say("ablation grid: warm-up")
    first_batch = [next(iter(view_loader(99)))]
    for trainer in trainers:
        wecolora_epoch(trainer, teacher, first_batch, recipe=recipe)
    without: list[list[float]] = [[] for _ in GRID]
    with_cache: list[list[float]] = [[] for _ in GRID]
    for rep in range(1 if config.quick else 2):
        for i, trainer in enumerate(trainers):
            say(f"ablation grid: round {rep + 1}, {trainer.name}")
            without[i].append(n / wecolora_epoch(trainer, teacher, view_loader(rep), recipe=recipe))
            if i == 0:  # the first student of the grid fills the shared cache (view 0 in round 1)
                seconds = n / wecolora_epoch(trainer, teacher, view_loader(rep), recipe=recipe,
                                             writer=cache.writer(rep, n))
            else:  # every later student reads it
                seconds = n / wecolora_epoch(trainer, teacher, view_loader(0, cache), recipe=recipe)
            with_cache[i].append(seconds)
    rows = [{"mode": mode, "reduction": reduction, "seconds_without_cache": min(without[i]),
             "seconds_with_cache": min(with_cache[i]), "cache": "cold (fills it)" if i == 0 else "warm"}
            for i, (mode, reduction) in enumerate(GRID)]
    total_with = sum(r["seconds_with_cache"] for r in rows)
    total_without = sum(r["seconds_without_cache"] for r in rows)
    return {"precision": precision, "students": rows, "seconds_with_cache": total_with,
            "seconds_without_cache": total_without, "cost_ratio": total_with / total_without,
            "note": "training seconds per epoch of each student; fixed per-run costs (building, export) excluded"}


def _bench_inference(config, teacher, rank, device, batch, say) -> dict:
    """images/s and peak memory of the teacher, the adapter students and the merged students (fp32)."""
    models = {"teacher": teacher.eval()}
    for r in (2, 3):
        student = build_student(teacher, r, mode="wecolora", rank=rank)
        with torch.no_grad():  # trained-looking adapters: the merge must not be a no-op
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(r)) * 0.01)
        models[f"adapters_r{r}"] = student.eval().to(device)
        models[f"merged_r{r}"] = adapters.merge(student).eval().to(device)
    images = torch.randn(batch, 3, *teacher.patch_embed.img_size, generator=torch.Generator().manual_seed(0)).to(device)
    calls = 10 if config.quick else 20

    def forward(model):
        with torch.inference_mode():
            model(images)

    say("inference: warm-up")
    for model in models.values():
        _time_calls(lambda: forward(model), device, 2)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for r in range(config.rounds):
        say(f"inference: round {r + 1}/{config.rounds}")
        for name, model in models.items():
            seconds[name].append(_time_calls(lambda: forward(model), device, calls))
    out = {}
    for name, values in seconds.items():
        out[name] = {"images_per_s": batch / min(values), "rounds": [batch / v for v in values],
                     "speedup": min(seconds["teacher"]) / min(values),
                     "blocks": len(models[name].blocks),
                     "weights_mb": sum(t.numel() * t.element_size() for t in models[name].state_dict().values()) / 2**20,
                     "peak_mb": peak_memory_mb(lambda: forward(models[name]), device)}
    for r in (2, 3):
        out[f"merged_r{r}"]["limit"] = len(teacher.blocks) / len(models[f"merged_r{r}"].blocks)
    return out


# ---------------------------------------------------------------------------------------------
# Report


def format_table(result: dict) -> str:
    """The printed report: throughput, ratios and peak memory per line, then the targets."""
    m, d, inf, grid = result["machine"], result["distill"], result["inference"], result["grid"]
    lines = [
        f"wecolora bench: {m['cpu']} ({m['torch_threads']} threads, {m['cpu_count']} cores), {m['device']}"
        + (f" {m['gpu']}" if m.get("gpu") else "") + f", torch {m['torch']}",
        f"teacher {result['teacher']} ({result['teacher_blocks']} blocks, width {result['width']}), rank "
        f"{result['rank']}, {result['images']} images of {result['data']}, batch {result['batch_size']}, "
        f"best of {result['config']['rounds']} interleaved rounds",
        "",
        f"{'distillation, r=2, all six adapters':<44}{'images/s':>10}{'vs reference':>14}{'peak MB':>10}",
    ]
    names = {"reference": "reference design (fp32, teacher every step)"}
    for p in result["precisions"]:
        names[f"{p}_cold"] = f"wecolora {p}, teacher cache cold"
        names[f"{p}_warm"] = f"wecolora {p}, teacher cache warm"
    for key, label in names.items():
        row = d[key]
        lines.append(f"  {label:<42}{row['images_per_s']:>10.0f}{row['speedup']:>13.2f}x{row['peak_mb']:>10.1f}")
    lines += ["", f"{'inference, fp32, batch ' + str(result['batch_size']):<44}{'images/s':>10}{'vs teacher':>14}"
                  f"{'peak MB':>10}{'weights MB':>12}"]
    labels = {"teacher": f"teacher ({result['teacher_blocks']} blocks)"}
    for r in (2, 3):
        labels[f"adapters_r{r}"] = f"r={r} student, adapters unmerged"
        labels[f"merged_r{r}"] = f"r={r} student, merged (limit {inf[f'merged_r{r}']['limit']:.2f}x)"
    for key, label in labels.items():
        row = inf[key]
        lines.append(f"  {label:<42}{row['images_per_s']:>10.0f}{row['speedup']:>13.2f}x{row['peak_mb']:>10.1f}"
                     f"{row['weights_mb']:>12.1f}")
    lines += ["(peak MB: tensor memory allocated during one step or forward, on top of the weights)", "",
              f"ablation grid, 6 students ({grid['precision']}), training seconds per epoch:"]
    for row in grid["students"]:
        lines.append(f"  {row['mode'] + ' r=' + str(row['reduction']):<20} without cache {row['seconds_without_cache']:6.2f}"
                     f"   with the shared cache {row['seconds_with_cache']:6.2f} ({row['cache']})")
    lines.append(f"  total {grid['seconds_with_cache']:.2f} s vs {grid['seconds_without_cache']:.2f} s: cost ratio "
                 f"{grid['cost_ratio']:.2f}")
    lines += ["", "targets:"]
    for key, target in result["targets"].items():
        sign = "<=" if key == "grid_cost_ratio" else ">="
        lines.append(f"  {key:<26}{result[key]:>6.2f} ({sign} {target['target']}: "
                     f"{'reached' if target['reached'] else 'NOT reached'})")
    if result.get("written_to"):
        lines += ["", f"written to {result['written_to']}"]
    return "\n".join(lines)
