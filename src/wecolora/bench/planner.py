"""``wecolora plan``: which student shape meets a budget on this device, measured rather than guessed.

Candidates are the depths the reductions give (``keep`` rule, or one explicit list) x residual widths in whole
heads x MLP hidden sizes. Each is built as the merged student would be (a plain timm ViT, random weights: latency
does not depend on their values; or exported to ONNX and run by ONNX Runtime) and measured on the device:

- latency per batch: the median of every timed call after warm-up, the calls spread over interleaved rounds
  (each round times every candidate in turn, so a busy spell of a shared machine hits all of them alike);
- throughput (images/s at that latency), parameters, FLOPs per image (``FlopCounterMode``), peak memory of one
  call above the weights (:func:`wecolora.bench.measure.peak_memory_mb`).

Both runtimes use torch's thread count (``OMP_NUM_THREADS`` or ``torch.set_num_threads``), so a plan made for a
deployment that pins its threads should be made with the same setting.

The teacher's own shape is always measured, so every candidate has a ``speedup`` over it. The Pareto front
holds the candidates no other one beats on both latency and size (faster and at least as many parameters).
A budget (``speedup``, ``latency_ms`` or ``params``) marks the candidates within it, and :func:`choose_shape`
picks the one ``distill --speedup`` trains.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from wecolora.bench.flops import forward_flops
from wecolora.bench.measure import machine, peak_memory_mb, sync
from wecolora.config import BUDGETS, DEFAULT_REDUCTION, KEEP_RULES, DistillConfig, PlanConfig, parse_keep
from wecolora.errors import UserError
from wecolora.files import atomic_write_bytes, atomic_write_text, csv_text
from wecolora.method.plan import plan_student
from wecolora.method.student import count_parameters, merged_architecture
from wecolora.method.width import StudentWidth, TeacherWidth
from wecolora.runtime import resolve_device
from wecolora.teachers.load import load_model
from wecolora.teachers.vit import architecture

_logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
COLUMNS = ("depth", "reduction", "embed_dim", "heads", "mlp_hidden", "params", "flops", "latency_ms", "throughput",
           "peak_mb", "speedup", "pareto", "within_budget", "teacher")
DEFAULT_REDUCTIONS = (1, 2, 3, 4)
QUARTERS = (0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------------------------
# Candidates


def candidate_depths(teacher: nn.Module, reductions, keep) -> list[tuple[int, int]]:
    """``(depth, reduction)`` of each distinct depth: the plan's kept list for each reduction, or one explicit list."""
    keep = parse_keep(keep)
    if not isinstance(keep, str):
        return [(len(plan_student(teacher, DEFAULT_REDUCTION, keep, "weco-kd").kept), DEFAULT_REDUCTION)]
    depths = {}
    for r in reductions or DEFAULT_REDUCTIONS:
        depth = len(teacher.blocks) if r == 1 else len(plan_student(teacher, r, keep, "weco-kd").kept)
        depths.setdefault(depth, r)  # the smallest reduction giving a depth
    return sorted(((d, r) for d, r in depths.items()), reverse=True)


def candidate_widths(full: TeacherWidth, embed_dims=None, mlp_hiddens=None) -> tuple[list[int], list[int]]:
    """Residual widths (whole heads) and MLP sizes: the given lists (checked), else quarters of the teacher's.

    >>> candidate_widths(TeacherWidth(128, 4, 32, 512))
    ([32, 64, 96, 128], [128, 256, 384, 512])
    """
    if embed_dims is None:
        embed_dims = [max(1, round(q * full.heads)) * full.head_dim for q in QUARTERS]
    if mlp_hiddens is None:
        mlp_hiddens = [max(8, round(q * full.mlp_hidden / 8) * 8) for q in QUARTERS]
    wrong = [d for d in embed_dims if d % full.head_dim or not 0 < d <= full.embed_dim]
    if wrong:
        raise UserError(f"--embed-dims {' '.join(map(str, wrong))} do not fit the teacher (width {full.embed_dim}, "
                        f"{full.heads} heads of {full.head_dim}): whole heads are kept, so choose multiples of "
                        f"{full.head_dim} from {full.head_dim} to {full.embed_dim}")
    wrong = [m for m in mlp_hiddens if not 0 < m <= full.mlp_hidden]
    if wrong:
        raise UserError(f"--mlp-hiddens {' '.join(map(str, wrong))} do not fit the teacher's {full.mlp_hidden} MLP "
                        f"neurons: choose 1 to {full.mlp_hidden}")
    return sorted(set(embed_dims)), sorted(set(mlp_hiddens))


def candidates(teacher: nn.Module, config: PlanConfig) -> list[dict]:
    """Every shape to measure; the teacher's own shape first (``teacher: True``)."""
    full = TeacherWidth.of(teacher)
    dims, hiddens = candidate_widths(full, config.embed_dims, config.mlp_hiddens)
    rows = [{"depth": len(teacher.blocks), "reduction": 1, "embed_dim": full.embed_dim, "heads": full.heads,
             "mlp_hidden": full.mlp_hidden, "teacher": True}]
    for depth, reduction in candidate_depths(teacher, config.reductions, config.keep):
        for d in sorted(dims, reverse=True):
            for m in sorted(hiddens, reverse=True):
                shape = {"depth": depth, "reduction": reduction, "embed_dim": d, "heads": d // full.head_dim,
                         "mlp_hidden": m, "teacher": False}
                if not any(_same_shape(shape, row) for row in rows):
                    rows.append(shape)
    return rows


def _same_shape(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("depth", "embed_dim", "mlp_hidden"))


# ---------------------------------------------------------------------------------------------
# Measuring


def build_candidate(teacher: nn.Module, shape: dict, device: torch.device) -> nn.Module:
    """The merged student of ``shape`` on ``device``: timm's architecture, weights ~ N(0, 0.02) (allocated without
    timm's slower init; values do not change the timing, and finite small ones avoid slow denormals)."""
    model = merged_architecture(teacher, shape["depth"], StudentWidth(shape["embed_dim"], shape["heads"],
                                                                      shape["mlp_hidden"]))
    model = model.to_empty(device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        for b in model.buffers():
            b.zero_()
    return model.eval()


class TorchRunner:
    """One forward of a candidate in torch, under ``inference_mode``."""

    def __init__(self, teacher, shape, device, images):
        self.model, self.images = build_candidate(teacher, shape, device), images

    def __call__(self):
        with torch.inference_mode():
            return self.model(self.images)


class OnnxRunner:
    """One run of a candidate's ONNX graph in ONNX Runtime (exported once, into ``folder``)."""

    def __init__(self, teacher, shape, device, images, folder: Path, index: int):
        from wecolora.export import ONNX_EXTRA, _export_graph

        try:
            import onnxruntime
        except ImportError as err:
            raise UserError(f"--runtime onnxruntime needs the onnx extra ({err.name} is missing): {ONNX_EXTRA}") from None
        path = folder / f"candidate-{index}.onnx"
        if not path.is_file():
            _export_graph(build_candidate(teacher, shape, torch.device("cpu")), images.cpu()[:2], path, opset=18)
        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise UserError("--runtime onnxruntime --device cuda needs onnxruntime-gpu (CUDAExecutionProvider is "
                            "not available); time on the CPU or with --runtime torch")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads torch would use: one comparison
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        self.feed = {self.session.get_inputs()[0].name: images.cpu().numpy()}

    def __call__(self):
        return self.session.run(None, self.feed)


def measure(teacher: nn.Module, shapes: list[dict], config: PlanConfig, device: torch.device, say) -> list[dict]:
    """Latency (median of every timed call), throughput, parameters, FLOPs and peak memory of each shape."""
    size = teacher.patch_embed.img_size
    images = torch.randn(config.batch_size, teacher.patch_embed.proj.in_channels, *size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    samples: list[list[float]] = [[] for _ in shapes]
    with (tempfile.TemporaryDirectory(prefix="wecolora-plan-") if config.runtime == "onnxruntime"
          else contextlib.nullcontext()) as folder:
        def runner(i: int):
            if config.runtime == "onnxruntime":
                return OnnxRunner(teacher, shapes[i], device, images, Path(folder), i)
            return TorchRunner(teacher, shapes[i], device, images)

        for r in range(config.rounds):
            say(f"round {r + 1}/{config.rounds}: {len(shapes)} candidates x {config.calls} calls "
                f"(batch {config.batch_size}, {config.runtime} on {device})")
            for i in range(len(shapes)):
                run = runner(i)  # built per round: memory stays one candidate's whatever their number
                for _ in range(config.warmup):
                    run()
                for _ in range(config.calls):
                    sync(device)
                    start = time.perf_counter()
                    run()
                    sync(device)
                    samples[i].append(time.perf_counter() - start)
                del run
        rows = []
        say("parameters, FLOPs" + (" and peak memory" if config.memory else ""))
        for i, shape in enumerate(shapes):
            meta = merged_architecture(teacher, shape["depth"], StudentWidth(shape["embed_dim"], shape["heads"],
                                                                           shape["mlp_hidden"]))
            latency = statistics.median(samples[i])
            row = {**shape, "params": count_parameters(meta), "flops": forward_flops(meta),
                   "latency_ms": 1000 * latency, "latency_min_ms": 1000 * min(samples[i]),
                   "throughput": config.batch_size / latency, "peak_mb": None}
            if config.memory:
                run = runner(i)
                run()
                row["peak_mb"] = peak_memory_mb(run, device)
                del run
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Front, budget, choice


def pareto_front(rows: list[dict]) -> list[bool]:
    """Whether each row is on the front: no other row is at least as fast and at least as large, and better on one.

    >>> pareto_front([{"latency_ms": 1, "params": 5}, {"latency_ms": 2, "params": 4}, {"latency_ms": 2, "params": 9}])
    [True, False, True]
    """
    def beats(a, b):
        return (a["latency_ms"] <= b["latency_ms"] and a["params"] >= b["params"]
                and (a["latency_ms"] < b["latency_ms"] or a["params"] > b["params"]))

    return [not any(beats(other, row) for other in rows if other is not row) for row in rows]


def within(row: dict, budget: tuple[str, float] | None) -> bool | None:
    """Whether a measured row meets the budget (None without one)."""
    if budget is None:
        return None
    name, value = budget
    if name == "speedup":
        return row["speedup"] >= value
    if name == "latency_ms":
        return row["latency_ms"] <= value
    return row["params"] <= value


CHOICE_RULE = "the most parameters within the budget (ties: the lowest latency)"


def choose_shape(rows: list[dict], budget: tuple[str, float]) -> dict | None:
    """The shape ``distill`` trains for a budget: :data:`CHOICE_RULE`; None when no candidate meets it.

    The largest student that fits keeps the most of the teacher's weights; on the bundled teachers that
    rule ranked the shapes of the shape study in the order of their probes (docs/shapes.md).
    """
    fitting = [row for row in rows if within(row, budget)]
    if not fitting:
        return None
    return min(fitting, key=lambda row: (-row["params"], row["latency_ms"], -row["depth"]))


def budget_of(config) -> tuple[str, float] | None:
    """``(name, value)`` of the budget a PlanConfig or DistillConfig gives, or None."""
    return next(((name, getattr(config, name)) for name in BUDGETS if getattr(config, name) is not None), None)


# ---------------------------------------------------------------------------------------------
# The command


def plan_shapes(config: PlanConfig, progress=None, *, teacher: nn.Module | None = None) -> dict:
    """Measure every candidate shape of ``config.teacher`` on the device; returns the plan (also written to
    ``config.output`` when given).

    Returns:
        ``{"teacher", "device", "runtime", "batch_size", "machine", "teacher_latency_ms", "budget", "rule",
        "chosen", "candidates": [{depth, reduction, embed_dim, heads, mlp_hidden, params, flops, latency_ms,
        throughput, peak_mb, speedup, pareto, within_budget, teacher}, ...]}``; ``flops`` per image.

    Example:
        >>> result = plan_shapes(PlanConfig(teacher="bundled", speedup=2))    # doctest: +SKIP
        >>> result["chosen"]["depth"], result["chosen"]["embed_dim"]           # doctest: +SKIP
    """
    started = time.perf_counter()
    report = progress or (lambda message: _logger.info("%s", message))

    def say(message: str) -> None:
        report(f"[{time.perf_counter() - started:5.1f} s] {message}")

    device = resolve_device(config.device)
    teacher = teacher if teacher is not None else load_model(config.teacher, img_size=config.img_size, pretrained=False)
    shapes = candidates(teacher, config)
    say(f"{len(shapes)} candidate shapes of {architecture(teacher)} ({len(teacher.blocks)} blocks, width "
        f"{teacher.embed_dim})")
    rows = measure(teacher, shapes, config, device, say)
    reference = rows[0]["latency_ms"]
    budget = budget_of(config)
    for row, front in zip(rows, pareto_front(rows)):
        row["speedup"] = reference / row["latency_ms"]
        row["pareto"] = front
        row["within_budget"] = within(row, budget)
    chosen = choose_shape(rows, budget) if budget else None
    result = {"teacher": config.teacher, "architecture": architecture(teacher), "device": str(device),
              "runtime": config.runtime, "batch_size": config.batch_size, "keep": config.keep, "rounds": config.rounds,
              "calls": config.calls, "warmup": config.warmup, "teacher_latency_ms": reference,
              "budget": None if budget is None else {"name": budget[0], "value": budget[1]},
              "rule": CHOICE_RULE, "chosen": chosen, "machine": machine(device),
              "measured_at": datetime.datetime.now().isoformat(timespec="seconds"), "candidates": rows}
    if config.output:
        write_plan(result, Path(config.output))
    return result


def write_plan(result: dict, folder: Path, name: str = PLAN_FILE) -> None:
    """``plan.json`` (everything), ``plan.csv`` (one row per candidate) and ``chart.png`` in ``folder`` (other
    names share the stem of ``name``: ``plan-s2.json``, ``plan-s2.csv``, ``plan-s2.png``)."""
    stem = Path(name).stem
    atomic_write_text(folder / name, json.dumps(result, indent=1))
    atomic_write_text(folder / f"{stem}.csv", csv_text(result["candidates"], COLUMNS))
    write_chart(result, folder / ("chart.png" if name == PLAN_FILE else f"{stem}.png"))


def write_chart(result: dict, path: Path) -> bool:
    """Latency against parameters, the front joined, the budget's shapes marked; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _logger.warning("no chart: matplotlib is missing (pip install 'wecolora[report]')")
        return False
    rows = result["candidates"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    depths = sorted({r["depth"] for r in rows})
    colors = plt.get_cmap("viridis")
    for i, depth in enumerate(depths):
        mine = [r for r in rows if r["depth"] == depth]
        ax.scatter([r["params"] / 1e6 for r in mine], [r["latency_ms"] for r in mine], s=22,
                   color=colors(i / max(1, len(depths) - 1)), label=f"depth {depth}", alpha=0.8)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["params"])
    ax.plot([r["params"] / 1e6 for r in front], [r["latency_ms"] for r in front], color="#d62728", lw=1.2,
            label="Pareto front")
    fit = [r for r in rows if r.get("within_budget")]
    if fit:
        ax.scatter([r["params"] / 1e6 for r in fit], [r["latency_ms"] for r in fit], s=70, facecolors="none",
                   edgecolors="#d62728", label=f"within {result['budget']['name']} {result['budget']['value']:g}")
    teacher = rows[0]
    ax.scatter([teacher["params"] / 1e6], [teacher["latency_ms"]], marker="*", s=160, color="black", label="teacher")
    if result.get("chosen"):
        c = result["chosen"]
        ax.scatter([c["params"] / 1e6], [c["latency_ms"]], marker="X", s=120, color="#d62728", label="chosen")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"latency per batch of {result['batch_size']} (ms, median)")
    ax.set_title(f"{result['architecture']} students, {result['runtime']} on {result['device']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True


# ---------------------------------------------------------------------------------------------
# A budget for distill


def plan_config_for(config: DistillConfig) -> PlanConfig:
    """The planner's settings for a distill run's budget: its teacher, device, runtime and batch, its keep rule
    (an explicit list fixes the depth; a searched keep is counted as ``first``: latency depends on the number)."""
    keep = parse_keep(config.keep)
    keep = keep if not isinstance(keep, str) else (keep if keep in KEEP_RULES else "first")
    name, value = config.budget()
    return PlanConfig(teacher=config.teacher, img_size=config.img_size,
                      device=config.device if config.budget_device == "auto" else config.budget_device,
                      runtime=config.budget_runtime, batch_size=config.budget_batch_size,
                      keep=",".join(map(str, keep)) if isinstance(keep, list) else keep, **{name: value})


def _same_request(saved: dict, plan: PlanConfig) -> bool:
    budget = budget_of(plan)
    return (saved.get("budget") == {"name": budget[0], "value": budget[1]} and saved.get("teacher") == plan.teacher
            and saved.get("keep") == plan.keep and saved.get("runtime") == plan.runtime
            and saved.get("batch_size") == plan.batch_size and saved.get("device") == str(resolve_device(plan.device))
            and saved.get("chosen") is not None)


def resolve_budget(config: DistillConfig, progress=None, *, plan_file: Path | None = None,
                   reuse: bool | None = None) -> tuple[DistillConfig, dict]:
    """``config`` with the reduction and widths the planner chose for its budget, and the plan.

    The plan is written to ``plan_file`` (default ``OUTPUT/plan.json``). With ``reuse`` (default: when the run
    resumes) a plan already there for the same budget is read instead of measuring again: a new measurement
    could choose another shape. Under torchrun the first process measures and every process takes its plan.
    """
    from wecolora.distributed import join_processes

    if config.width_given():
        widths = [n for n in ("embed_dim", "heads", "mlp_hidden", "width_ratio") if getattr(config, n) is not None]
        raise UserError(f"--{config.budget()[0].replace('_', '-')} chooses the student's shape, so it cannot be "
                        f"combined with {', '.join('--' + w.replace('_', '-') for w in widths)}: give the budget or "
                        f"the widths")
    plan = plan_config_for(config)
    plan_file = Path(plan_file) if plan_file is not None else Path(config.output) / PLAN_FILE
    reuse = bool(config.resume) if reuse is None else reuse
    state = join_processes(resolve_device(config.device))
    payload = None
    if state.is_main_process:
        try:
            payload = ("plan", _plan_for_budget(config, plan, plan_file, reuse, progress))
        except UserError as err:
            payload = ("error", str(err))
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        payload = broadcast_object_list([payload])[0]
    if payload[0] == "error":
        raise UserError(payload[1])
    result = payload[1]
    chosen = result["chosen"]
    keep = parse_keep(config.keep)
    resolved = dataclasses.replace(config, reduction=config.reduction if isinstance(keep, list) else chosen["reduction"],
                                   embed_dim=chosen["embed_dim"], mlp_hidden=chosen["mlp_hidden"])
    if state.is_main_process:  # said before training starts, not only in the run's last line
        name, value = config.budget()
        _logger.info("%s %g: training depth %d, width %d (%d heads), MLP %d: %.2f ms, %.2fx the teacher, %.2fM "
                     "params, %s; table in %s", name.replace("_", "-"), value, chosen["depth"], chosen["embed_dim"],
                     chosen["heads"], chosen["mlp_hidden"], chosen["latency_ms"], chosen["speedup"],
                     chosen["params"] / 1e6, CHOICE_RULE, plan_file)
    return resolved, result


def _plan_for_budget(config: DistillConfig, plan: PlanConfig, plan_file: Path, reuse: bool, progress) -> dict:
    """The plan of a budget: read back from ``plan_file`` (``reuse``, same request) or measured and written there."""
    if reuse and plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        if _same_request(saved, plan):
            _logger.info("%s: reusing the shape %s chose", config.budget()[0], plan_file)
            return saved
    result = plan_shapes(plan, progress)
    if result["chosen"] is None:
        name, value = config.budget()
        best = (max(result["candidates"], key=lambda r: r["speedup"]) if name != "params"
                else min(result["candidates"], key=lambda r: r["params"]))
        raise UserError(f"no candidate shape meets --{name.replace('_', '-')} {value:g} on {result['device']}: the "
                        f"{'fastest' if name != 'params' else 'smallest'} measured is depth {best['depth']}, width "
                        f"{best['embed_dim']}, MLP {best['mlp_hidden']} ({best['latency_ms']:.2f} ms, "
                        f"{best['speedup']:.2f}x, {best['params']:,} params); relax the budget, or run "
                        f"`wecolora plan` with more --reductions/--embed-dims/--mlp-hiddens")
    write_plan(result, plan_file.parent, name=plan_file.name)
    return result
