"""``wecolora bench``: distillation and inference throughput on this machine, against the paper's code design
and against the machine's own ceiling.

Everything is measured in ONE process, in interleaved rounds (reference, then each wecolora line, then
again), so that a busy spell of a shared machine hits every line alike; each line reports its best round
(other processes only ever slow a round down) and a ratio is a ratio of best rounds. Measured:

1. distillation images/s (r=2, all six adapters): the reference design (:mod:`wecolora.bench.reference`)
   against wecolora's own training step (:func:`wecolora.train.distill.train_one_epoch` on the set-up of
   :func:`wecolora.train.setup.make_training`, with the teacher cache cold: teacher run and tokens stored;
   warm: tokens read back), in fp32 and, where the hardware has fast bf16, in bf16 autocast; and each
   line's ceiling: the same loop on batches already on the device (no loader, no cache I/O), so that
   what the data path loses is visible (``cold_fraction_of_ceiling``, ``warm_fraction_of_ceiling``);
2. FLOPs per image of every line (``FlopCounterMode``), the TFLOP/s achieved, and on a known GPU the
   fraction of its bf16 peak; ``step_flops_ratio``: the wecolora student's step FLOPs over a full
   fine-tune step of the same student (``weco-kd``), for this teacher and for a ViT-B/16 at rank 128;
3. inference images/s of the teacher, of the unmerged adapter students and of the merged students
   (r = 2 and 3), fp32;
4. peak memory of each (tensor allocations during one step or forward);
5. the training cost of an ablation grid of six students (wecolora, lora-qv, weco-kd at r = 2 and 3)
   with one shared teacher cache (the first student fills it) against the same grid without it.

The CLI prints the table (:func:`wecolora.bench_report.format_table`, or ``--json``: one object) and
writes ``benchmarks/results/bench-*.json``.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from wecolora.bench.flops import count, student_step_flops
from wecolora.bench.measure import best, bf16_peak_tflops, fast_bf16, machine, peak_memory_mb, sync, time_calls
from wecolora.bench.reference import reference_epoch, reference_step, reference_student
from wecolora.cache.images import StoreBatches, open_store, store_loader
from wecolora.cache.teacher import TeacherCache
from wecolora.config import DEFAULT_REDUCTION
from wecolora.data.datasets import open_dataset
from wecolora.data.subset import few_shot_indices
from wecolora.data.transforms import train_transform
from wecolora.data.views import ViewRecipe
from wecolora.errors import UserError
from wecolora.files import atomic_write_text
from wecolora.method.adapters import merge
from wecolora.method.plan import plan_student
from wecolora.method.student import build_student
from wecolora.runtime import resolve_device
from wecolora.teachers.load import load_model
from wecolora.teachers.vit import architecture, last_block_tokens, use_fused_attention
from wecolora.train.setup import Training, make_training, plain_attention

_logger = logging.getLogger(__name__)

GRID = [("wecolora", 2), ("wecolora", 3), ("lora-qv", 2), ("lora-qv", 3), ("weco-kd", 2), ("weco-kd", 3)]
TARGETS = {"distill_speedup_cold": 1.5, "distill_speedup_warm": 2.5, "infer_speedup_r2": 1.85,
           "infer_speedup_r3": 2.6, "grid_cost_ratio": 0.5, "step_flops_ratio": 0.95,
           "cold_fraction_of_ceiling": 0.8, "warm_fraction_of_ceiling": 0.8}
AT_MOST = {"grid_cost_ratio", "step_flops_ratio"}  # targets that are upper bounds


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
    """A student set up as ``distill`` sets it up, at one precision."""
    name: str
    training: Training
    accelerator: LocalAccelerator


def make_trainer(teacher: nn.Module, *, mode: str, reduction: int, rank: int, precision: str, device: torch.device,
                 updates_per_epoch: int) -> Trainer:
    plan = plan_student(teacher, reduction, "first", mode, rank)
    training = make_training(teacher, plan, lr=1e-4, weight_decay=0.05, epochs=10_000, warmup_epochs=0,
                             updates_per_epoch=updates_per_epoch, device=device, precision=precision)
    return Trainer(f"{mode} r={reduction}", training, LocalAccelerator(device, precision))


@contextlib.contextmanager
def _teacher_attention(teacher: nn.Module, accelerator: LocalAccelerator):
    """The teacher's attention as distill sets it: plain matmuls under bf16 on the CPU, else as it was."""
    modules = [m for m in teacher.modules() if hasattr(m, "fused_attn")]
    before = [m.fused_attn for m in modules]
    if plain_attention(accelerator.device, accelerator.precision):
        use_fused_attention([teacher], False)
    try:
        yield
    finally:
        for module, fused in zip(modules, before):
            module.fused_attn = fused


def wecolora_epoch(trainer: Trainer, teacher, loader, *, recipe: ViewRecipe, writer=None) -> float:
    """One epoch of :func:`wecolora.train.distill.train_one_epoch`; returns images/s."""
    from tqdm.auto import tqdm

    from wecolora.train.distill import train_one_epoch

    t = trainer.training
    with tqdm(disable=True) as bar, _teacher_attention(teacher, trainer.accelerator):
        metrics, _ = train_one_epoch(t.matcher, teacher, loader, t.optimizer, t.scheduler, trainer.accelerator, bar,
                                     recipe=recipe, teacher_blocks=t.teacher_blocks, norm=t.norm, loss_kind="l1",
                                     updates=0, epoch=0, writer=writer)
    sync(trainer.accelerator.device)
    if writer is not None and not writer.commit():
        raise RuntimeError("the teacher cache view was not complete after an epoch")
    return metrics["images_per_s"]


def device_batches(loader, device: torch.device, recipe: ViewRecipe, *,
                   tokens_from: nn.Module | None = None, teacher_blocks: list[int] | None = None) -> list[dict]:
    """Every batch of ``loader`` (:class:`wecolora.cache.images.StoreBatches` items) moved to ``device`` once,
    with the teacher's tokens for its views when ``tokens_from`` is given. An epoch over them is the loop
    without its loader and cache I/O (the views are still cut on the device, as in training)."""
    batches = []
    for batch in loader:
        batch = {k: v if k == "positions" else v.to(device) for k, v in batch.items()}
        if tokens_from is not None:
            with torch.no_grad():
                images = recipe.apply(batch["pixels"], batch["boxes"], batch["flips"])
                batch["tokens"] = last_block_tokens(tokens_from, images, teacher_blocks)
        batches.append(batch)
    return batches


# ---------------------------------------------------------------------------------------------
# The benchmark


def run_bench(config: BenchConfig, progress=None) -> dict:
    """Run every measurement; returns the results (also written as JSON under ``config.output_dir``).

    Example:
        >>> result = run_bench(BenchConfig(quick=True))   # doctest: +SKIP
        >>> result["distill_speedup_warm"], result["step_flops_ratio"]   # doctest: +SKIP
    """
    started = time.perf_counter()
    report = progress or (lambda message: _logger.info("%s", message))

    def say(message: str) -> None:
        report(f"[{time.perf_counter() - started:5.1f} s] {message}")

    device = resolve_device(config.device)
    torch.manual_seed(0)
    teacher = load_model(config.teacher).requires_grad_(False).to(device)
    plan = plan_student(teacher, DEFAULT_REDUCTION, mode="wecolora")  # the measured student: its rank is the default
    precisions = ["fp32", "bf16"] if config.precision == "auto" and fast_bf16(device) else \
        (["fp32"] if config.precision == "auto" else [config.precision])
    if "bf16" in precisions and device.type == "cpu" and not fast_bf16(device):
        _logger.warning("this CPU has neither AVX-512 BF16 nor AMX: bf16 will be slow")
    data = _bench_data(config, teacher, device)
    n, batch, rank = len(data.indices), config.batch_size, plan.rank
    updates_per_epoch = math.ceil(n / batch)
    result = {"config": asdict(config), "machine": machine(device), "teacher": architecture(teacher),
              "teacher_blocks": len(teacher.blocks), "width": teacher.embed_dim, "rank": rank, "images": n,
              "batch_size": batch, "precisions": precisions, "data": data.spec}

    with tempfile.TemporaryDirectory(prefix="wecolora-bench-") as cache_root:
        caches = {p: TeacherCache.open(
            cache_root, teacher=teacher, dataset=data.dataset, indices=data.indices, transform=data.recipe, seed=0,
            teacher_blocks=[len(teacher.blocks) - 1], norm=False, precision=p) for p in precisions}
        result["distill"] = _bench_distill(config, teacher, plan, precisions, caches, data.recipe, data.view_loader,
                                           data.reference_loader, device, n, batch, updates_per_epoch, say)
        result["grid"] = _bench_grid(config, teacher, rank, precisions[-1], cache_root, data.dataset, data.indices,
                                     data.recipe, data.view_loader, device, n, updates_per_epoch, say)
    result["inference"] = _bench_inference(config, teacher, rank, device, batch, say)
    say("FLOPs of a full fine-tune step: this teacher and a ViT-B/16 (random weights, rank 128)")
    result["flops"] = _bench_step_flops(teacher, rank, batch)
    result.update(headline(result))
    result["targets"] = {k: {"target": v, "at_most": k in AT_MOST,
                             "reached": (result[k] <= v) if k in AT_MOST else (result[k] >= v)} for k, v in TARGETS.items()}
    if config.output_dir:
        result["written_to"] = str(_write_json(config, result))
    return result


@dataclass
class BenchData:
    """The bench's few-shot subset: its image store and view loader, and the reference's per-image pipeline."""
    spec: str
    dataset: object
    indices: list[int]
    recipe: ViewRecipe
    view_loader: object  # (view, cache=None) -> a loader of StoreBatches items
    reference_loader: DataLoader


def _bench_data(config: BenchConfig, teacher: nn.Module, device: torch.device) -> BenchData:
    """A few-shot subset with the paper's augmentation (mnist-5k when Fashion-MNIST is not installed)."""
    spec = config.data
    try:
        dataset = open_dataset(spec, "train")
    except UserError:
        if spec != "fashion-mnist":
            raise
        spec = "mnist-5k"
        dataset = open_dataset(spec, "train")
    per_class = max(1, math.ceil(config.images / len(dataset.classes)))
    indices = few_shot_indices(dataset.targets, per_class=per_class, seed=0)[:config.images]
    recipe = ViewRecipe.for_model(teacher)
    store = open_store(dataset, indices, bound=recipe.bound, num_workers=config.num_workers)
    generator = torch.Generator()

    def view_loader(view: int, cache=None) -> DataLoader:
        """View ``view`` of the subset cut from the image store, with its cached tokens when ``cache`` is given."""
        generator.manual_seed(view)
        batches = StoreBatches(store, indices, recipe, seed=0, view=view, cache=cache)
        return store_loader(batches, config.batch_size, generator, num_workers=config.num_workers,
                            pin_memory=device.type == "cuda")

    reference_data = open_dataset(spec, "train", transform=train_transform(teacher))  # the plain per-image pipeline
    reference_loader = DataLoader(Subset(reference_data, indices), batch_size=config.batch_size, shuffle=True,
                                  num_workers=config.num_workers)
    return BenchData(spec, dataset, indices, recipe, view_loader, reference_loader)


def headline(result: dict) -> dict:
    """The JSON keys the contract names (speed-ups, fractions of the ceilings, FLOP and cost ratios), at the
    highest precision measured."""
    top = result["precisions"][-1]
    d, inf = result["distill"], result["inference"]
    return {
        "distill_precision": top,
        "distill_speedup_cold": d[f"{top}_cold"]["speedup"],
        "distill_speedup_warm": d[f"{top}_warm"]["speedup"],
        "distill_speedup_cold_fp32": d["fp32_cold"]["speedup"] if "fp32_cold" in d else None,
        "distill_speedup_warm_fp32": d["fp32_warm"]["speedup"] if "fp32_warm" in d else None,
        "cold_fraction_of_ceiling": d[f"{top}_cold"]["of_ceiling"],
        "warm_fraction_of_ceiling": d[f"{top}_warm"]["of_ceiling"],
        "step_flops_ratio": result["flops"]["step_flops_ratio"],
        "step_flops_ratio_vit_b": result["flops"]["vit_b"]["step_flops_ratio"],
        "infer_speedup_r2": inf["merged_r2"]["speedup"],
        "infer_speedup_r3": inf["merged_r3"]["speedup"],
        "grid_cost_ratio": result["grid"]["cost_ratio"],
    }


def _write_json(config: BenchConfig, result: dict) -> Path:
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"bench-{stamp}{'-quick' if config.quick else ''}.json"
    atomic_write_text(path, json.dumps(result, indent=1))
    return path


def _bench_distill(config, teacher, plan, precisions, caches, recipe, view_loader, reference_loader, device, n, batch,
                   updates_per_epoch, say) -> dict:
    """images/s, speed-up, FLOPs and peak memory of the reference, the cold and warm wecolora lines and their ceilings."""
    from torch.optim import AdamW

    last = [len(teacher.blocks) - 1]
    reference = reference_student(teacher, plan.reduction, plan.rank).to(device)
    ref_optimizer = AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05,
                          betas=(0.9, 0.95))
    trainers = {p: make_trainer(teacher, mode=plan.mode, reduction=plan.reduction, rank=plan.rank, precision=p, device=device,
                                updates_per_epoch=updates_per_epoch) for p in precisions}
    # The ceilings' data: one epoch of canvas rows and view parameters on the device (and the teacher's tokens).
    ready = device_batches(view_loader(0), device, recipe)
    ready_tokens = device_batches(view_loader(0), device, recipe, tokens_from=teacher, teacher_blocks=last)

    def cold(p: str, view: int) -> float:
        return wecolora_epoch(trainers[p], teacher, view_loader(view), recipe=recipe, writer=caches[p].writer(view, n))

    def warm(p: str) -> float:
        return wecolora_epoch(trainers[p], teacher, view_loader(0, caches[p]), recipe=recipe)

    # Each line is one epoch as a function of the round (cold epochs need a view never computed before).
    lines = {"reference": lambda r: reference_epoch(reference, teacher, reference_loader, ref_optimizer, device, last)}
    for p in precisions:
        lines[f"{p}_cold_ceiling"] = lambda r, p=p: wecolora_epoch(trainers[p], teacher, ready, recipe=recipe)
        lines[f"{p}_cold"] = lambda r, p=p: cold(p, r + 1)
        lines[f"{p}_warm_ceiling"] = lambda r, p=p: wecolora_epoch(trainers[p], teacher, ready_tokens, recipe=recipe)
        lines[f"{p}_warm"] = lambda r, p=p: warm(p)

    say(f"distillation: warm-up ({n} images, batch {batch}, {', '.join(precisions)})")
    for name, line in lines.items():
        line(-1)  # the cold line's warm-up fills view 0: the view the warm epochs read
    rates: dict[str, list[float]] = {name: [] for name in lines}
    for r in range(config.rounds):
        say(f"distillation: round {r + 1}/{config.rounds}")
        for name, line in lines.items():
            rates[name].append(line(r))

    say("distillation: FLOPs and peak memory")
    images = recipe.apply(ready[0]["pixels"], ready[0]["boxes"], ready[0]["flips"])
    one = {"reference": lambda: reference_step(reference, teacher, images, ref_optimizer, last)}
    for p in precisions:
        one[f"{p}_cold_ceiling"] = one[f"{p}_cold"] = lambda p=p: wecolora_epoch(trainers[p], teacher, ready[:1],
                                                                                  recipe=recipe)
        one[f"{p}_warm_ceiling"] = one[f"{p}_warm"] = lambda p=p: wecolora_epoch(trainers[p], teacher, ready_tokens[:1],
                                                                                  recipe=recipe)
    peak = bf16_peak_tflops(device)
    out = {}
    for name, values in rates.items():
        per_image = count(one[name]) / len(images)
        row = {"images_per_s": best(values), "rounds": values, "speedup": best(values) / best(rates["reference"]),
               "gflop_per_image": per_image / 1e9, "tflops": best(values) * per_image / 1e12,
               "peak_mb": peak_memory_mb(one[name], device)}
        if peak:
            row["fraction_of_bf16_peak"] = row["tflops"] / peak
        out[name] = row
    for p in precisions:
        for kind in ("cold", "warm"):
            out[f"{p}_{kind}"]["of_ceiling"] = out[f"{p}_{kind}"]["images_per_s"] / out[f"{p}_{kind}_ceiling"]["images_per_s"]
    return out


def _bench_step_flops(teacher: nn.Module, rank: int, batch: int) -> dict:
    """``step_flops_ratio``: the wecolora student's step FLOPs (r=2, all six adapters, lean path) over a full
    fine-tune step of the same student (``weco-kd``: every copied weight trains), counted on the ``meta``
    device at the bench's batch, for this teacher and for a ViT-B/16 at 224 px with rank 128."""
    import timm

    def counted(meta: nn.Module, rank: int) -> dict:
        images = torch.empty(batch, 3, *meta.patch_embed.img_size, device="meta")
        lean, full = (student_step_flops(meta, images, mode=mode, rank=rank) for mode in ("wecolora", "weco-kd"))
        return {"rank": rank, "wecolora_gflop_per_image": lean / batch / 1e9,
                "full_finetune_gflop_per_image": full / batch / 1e9, "step_flops_ratio": lean / full}

    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).requires_grad_(False)
    return {**counted(copy.deepcopy(teacher).to("meta"), rank), "batch": batch, "vit_b": counted(vit_b, 128)}


def _bench_grid(config, teacher, rank, precision, cache_root, dataset, indices, recipe, view_loader, device,
                n, updates_per_epoch, say) -> dict:
    """Per-epoch training seconds of the six students with and without one shared cache."""
    cache = TeacherCache.open(Path(cache_root) / "grid", teacher=teacher, dataset=dataset,
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
    """images/s, FLOPs and peak memory of the teacher, the adapter students and the merged students (fp32)."""
    models = {"teacher": teacher.eval()}
    for r in (2, 3):
        student = build_student(teacher, r, mode="wecolora", rank=rank)
        with torch.no_grad():  # trained-looking adapters: the merge must not be a no-op
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(r)) * 0.01)
        models[f"adapters_r{r}"] = student.eval().to(device)
        models[f"merged_r{r}"] = merge(student).eval().to(device)
    images = torch.randn(batch, 3, *teacher.patch_embed.img_size, generator=torch.Generator().manual_seed(0)).to(device)
    calls = 10 if config.quick else 20

    def forward(model):
        with torch.inference_mode():
            model(images)

    say("inference: warm-up")
    for model in models.values():
        time_calls(lambda: forward(model), device, 2)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for r in range(config.rounds):
        say(f"inference: round {r + 1}/{config.rounds}")
        for name, model in models.items():
            seconds[name].append(time_calls(lambda: forward(model), device, calls))
    out = {}
    for name, values in seconds.items():
        per_image = count(lambda: forward(models[name])) / batch
        out[name] = {"images_per_s": batch / min(values), "rounds": [batch / v for v in values],
                     "speedup": min(seconds["teacher"]) / min(values),
                     "gflop_per_image": per_image / 1e9, "tflops": batch / min(values) * per_image / 1e12,
                     "blocks": len(models[name].blocks),
                     "weights_mb": sum(t.numel() * t.element_size() for t in models[name].state_dict().values()) / 2**20,
                     "peak_mb": peak_memory_mb(lambda: forward(models[name]), device)}
    for r in (2, 3):
        out[f"merged_r{r}"]["limit"] = len(teacher.blocks) / len(models[f"merged_r{r}"].blocks)
    return out
