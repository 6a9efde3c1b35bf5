"""wecolora's Python API: everything the CLI does, one function per command.

Importing it (or ``wecolora``) reads no torch. Each function first checks what it was given with the
standard library alone (paths, folders, names, run states), so a wrong path fails in a fraction of a
second, and imports the layer that does the work only then.

Example:
    >>> import wecolora
    >>> run = wecolora.distill(teacher="bundled", data="fashion-mnist", output="runs/fm-r2")  # doctest: +SKIP
    >>> wecolora.probe("runs/fm-r2", "fashion-mnist", "runs/fm-r2/probe")["top1"]          # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

from wecolora.config import (
    DEFAULT_REDUCTION,
    DistillConfig,
    KnnConfig,
    PlanConfig,
    PretrainConfig,
    ProbeConfig,
    build_config,
    check_budget,
)
from wecolora.data.layout import check_dataset, check_segmentation_dataset
from wecolora.files import check_writable
from wecolora.teachers.specs import check_model_spec
from wecolora.train.run_folder import check_distill, check_pretrain


def distill(config: DistillConfig | None = None, **settings) -> dict:
    """Distil a teacher into a weight-copied student; writes the run folder (see ``wecolora distill --help``).

    With a shape budget (``speedup``, ``latency_ms`` or ``params``), the planner (:func:`plan`) measures the
    candidate shapes on the budget's device first, chooses one (:func:`wecolora.bench.planner.choose_shape`),
    writes its table to ``OUTPUT/plan.json`` and the run trains that shape.

    Args:
        config: the run's settings; ``**settings`` builds one instead (``teacher=``, ``data=``, ``output=``, ...).

    Returns:
        The last epoch's metrics, the kept blocks, the widths and the run's paths (``shape_budget``: the
        budget, the chosen shape and why, when one was given).
    """
    config = config or build_config(DistillConfig, None, **settings)
    check_budget(config)  # a budget chooses the widths: not both from the user
    check_distill(config)
    shape = None
    if config.budget() is not None:
        from wecolora.bench.planner import CHOICE_RULE, resolve_budget

        config, result = resolve_budget(config)
        name, value = config.budget()
        shape = {"budget": name, "value": value, "chosen": result["chosen"], "why": CHOICE_RULE}
    from wecolora.train.distill import distill as run

    out = run(config)
    return {**out, "shape_budget": shape} if shape else out


def plan(config: PlanConfig | None = None, *, progress=None, **settings) -> dict:
    """Candidate student shapes of a teacher measured on a device, the Pareto front and a budget
    (``wecolora plan``); see :func:`wecolora.bench.planner.plan_shapes`.

    Example:
        >>> result = wecolora.plan(teacher="bundled", speedup=2)                      # doctest: +SKIP
        >>> [(c["depth"], c["embed_dim"], c["latency_ms"]) for c in result["candidates"] if c["pareto"]]  # doctest: +SKIP
    """
    config = config or build_config(PlanConfig, None, **settings)
    check_model_spec(config.teacher)
    if config.output:
        check_writable(config.output)
    from wecolora.bench.planner import plan_shapes

    return plan_shapes(config, progress)


def views(count: int, output: str, config: DistillConfig | None = None, **settings) -> list[dict]:
    """Write the first ``count`` training views a distillation with these settings would show: ``output/view-000.png``
    ... (8-bit RGB at the teacher's input size, before normalisation) and ``output/views.json`` (per view: the
    source image, its box ``[top, left, height, width]`` on the original, its flip). See ``wecolora views --help``.

    Args:
        count: how many views (epoch 1 in the subset's order, then epoch 2, ...).
        output: the folder to write (new, empty, or holding earlier views, which are replaced).
        config: a distillation's settings; ``**settings`` builds one instead (``teacher=``, ``data=``, ``ratio=``...).

    Example:
        >>> records = wecolora.views(16, "/tmp/views", teacher="bundled", data="fashion-mnist")  # doctest: +SKIP
        >>> records[0]["box"], records[0]["flip"]  # doctest: +SKIP
        ([3, 1, 21, 24], False)
    """
    config = config or build_config(DistillConfig, None, output=output, **settings)
    check_model_spec(config.teacher)
    check_dataset(config.data, ("train",))
    check_writable(output)
    from wecolora.train.views import write_views

    return write_views(config, count, output)


def pretrain(config: PretrainConfig | None = None, **settings) -> dict:
    """Train a ViT teacher from scratch (supervised or MAE); writes ``DIR/model``, a timm folder."""
    config = config or build_config(PretrainConfig, None, **settings)
    check_pretrain(config)
    from wecolora.train.pretrain import pretrain as run

    return run(config)


def check_evaluation(model: str, data: str, output: str, task: str = "classification", *,
                     test_data: str | None = None, options: dict | None = None) -> Path:
    """Path-level checks of ``probe``/``knn``: the model spec, a labelled source with a test split (its own, or
    ``test_data``; image + mask pairs for ``task="segmentation"``), the output."""
    check_model_spec(model, "--model")
    if task == "segmentation":
        check_segmentation_dataset(data, ("train", "test"))
    else:
        check_dataset(data, ("train", "test"), test_data=test_data, need_labels=True, **(options or {}))
    return check_writable(output)


def probe(model: str, data: str, output: str, config: ProbeConfig | None = None, *, device: str = "auto",
          test_data: str | None = None, **settings) -> dict:
    """Linear probe of a frozen model (MAE's recipe); writes ``output/results.json``.

    ``test_data``: the test images when ``data`` has no test split (a csv list, shards...). A multi-label source
    (a csv label column of ``A|B`` values, or several 0/1 columns) trains one binary cross-entropy per label
    and reports ``auc``, the mean ROC-AUC. ``task="segmentation"`` probes the patch tokens instead (a 1x1
    head, per-pixel cross-entropy) on image + mask pairs and reports ``miou``, ``pixel_accuracy`` and
    ``per_class_iou``.

    Example:
        >>> wecolora.probe("runs/fm-r2", "mnist-5k", "runs/fm-r2/probe", epochs=90)["top1"]  # doctest: +SKIP
        >>> wecolora.probe("runs/fm-r2", "fashion-mnist-seg", "runs/fm-r2/seg", task="segmentation")["miou"]  # doctest: +SKIP
    """
    config = config or build_config(ProbeConfig, None, **settings)
    check_evaluation(model, data, output, config.task, test_data=test_data, options=config.source_options())
    from wecolora.evaluation.probe import probe as run

    return run(model, data, output, config, device=device, test_data=test_data)


def knn(model: str, data: str, output: str, config: KnnConfig | None = None, *, device: str = "auto",
        test_data: str | None = None, **settings) -> dict:
    """Weighted kNN of the test split on the train split's frozen features; writes ``output/results.json``."""
    config = config or build_config(KnnConfig, None, **settings)
    check_evaluation(model, data, output, test_data=test_data, options=config.source_options())
    from wecolora.evaluation.knn import knn as run

    return run(model, data, output, config, device=device, test_data=test_data)


def report(runs: list[str], output: str) -> str:
    """Gather ``results.json`` files into ``output/report.md`` and ``report.csv``; returns the markdown."""
    from wecolora.evaluation.reports import write_report

    return write_report(runs, output)


def load_ablation(preset: str | None = None, config_file: str | None = None, *, quick: bool = False, **overrides):
    """An ablation grid from a preset name or a YAML file, validated (see ``wecolora ablate --help``).

    ``overrides``: ``teacher``, ``distill_data``, ``probe_data`` in place of the grid's own (None: keep them).
    """
    from wecolora.grid.ablate import load_ablation as load

    return load(preset, config_file, quick=quick, **overrides)


def check_ablation(grid, output: str) -> Path:
    """Path-level checks of an ablation grid: teacher, datasets, output."""
    check_model_spec(grid.teacher)
    source = {k: grid.distill[k] for k in ("folder_layout", "image_column", "label_column") if k in grid.distill}
    check_dataset(grid.distill_data, ("train",), **source)
    for probe_set in grid.probe_sets:
        if probe_set.config.task == "segmentation":
            check_segmentation_dataset(probe_set.data, ("train", "test"), "--probe-data")
        else:
            check_dataset(probe_set.data, ("train", "test"), "--probe-data", need_labels=True,
                          **probe_set.config.source_options())
    return check_writable(output)


def ablate(grid, output: str, *, device: str = "auto", shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run a grid of distillations and probes; writes report.md, results.csv and chart.png under ``output``."""
    check_ablation(grid, output)
    from wecolora.grid.ablate import ablate as run

    return run(grid, output, device=device, shard=shard)


def bench(config=None, progress=None, **settings) -> dict:
    """Measure wecolora against the paper's design on this machine (``wecolora bench``)."""
    from wecolora.bench.run import BenchConfig, run_bench

    return run_bench(config or BenchConfig(**settings), progress=progress)


def export(run: str, path: str | None = None, *, opset: int = 18) -> dict:
    """Export a run's merged student to ONNX, checked against torch with onnxruntime."""
    from wecolora.export import export_onnx

    return export_onnx(run, path, opset=opset)


def load_model(spec: str, **options):
    """A timm ViT from a spec (timm name, folder, run, ``bundled``...); see :func:`wecolora.teachers.load.load_model`."""
    check_model_spec(spec, "--model")
    from wecolora.teachers.load import load_model as load

    return load(spec, **options)


def inspect(teacher: str, reduction: int = DEFAULT_REDUCTION, keep="first", mode: str = "wecolora", rank: int | None = None, *,
            img_size: int | None = None, **width) -> dict:
    """Kept blocks, widths, parameter counts and FLOPs per image of a student, without reading weights
    (``wecolora inspect``); ``width``: ``embed_dim``, ``heads``, ``mlp_hidden`` or ``width_ratio``."""
    check_model_spec(teacher)
    from wecolora.bench.flops import forward_flops
    from wecolora.method.student import describe, merged_architecture
    from wecolora.method.width import StudentWidth
    from wecolora.teachers.load import load_model as load

    model = load(teacher, img_size=img_size, pretrained=False)
    info = describe(model, reduction, keep, mode, rank, **width)
    student = merged_architecture(model, len(info["kept_blocks"]),
                                  StudentWidth(info["embed_dim"], info["heads"], info["mlp_hidden"]))
    return {**info, "teacher_flops": forward_flops(model.to("meta")), "student_flops": forward_flops(student)}


def plan_student(teacher, reduction: int = DEFAULT_REDUCTION, keep="first", mode: str = "wecolora", rank: int | None = None,
                 **options):
    """The student's settings resolved against a teacher module: see :func:`wecolora.method.plan.plan_student`."""
    from wecolora.method.plan import plan_student as plan

    return plan(teacher, reduction, keep, mode, rank, **options)


def build_student(teacher, reduction: int = DEFAULT_REDUCTION, keep="first", mode: str = "wecolora", rank: int | None = None,
                  **options):
    """The student of a teacher module for a mode: see :func:`wecolora.method.student.build_student`."""
    from wecolora.method.student import build_student as build

    return build(teacher, reduction, keep, mode, rank, **options)


def merge(student):
    """The student with its adapters folded in: a plain timm VisionTransformer (see :mod:`wecolora.method.adapters`)."""
    from wecolora.method.adapters import merge as fold

    return fold(student)


def select_blocks(depth: int, reduction: int, keep="first") -> list[int]:
    """Teacher blocks a rule keeps: ``select_blocks(12, 3, "first") == [0, 3, 6, 9]``."""
    from wecolora.method.blocks import select_blocks as select

    return select(depth, reduction, keep)


def cache_entries(cache_dir: str | None = None) -> list:
    """The entries of wecolora's caches (teacher tokens, image stores, probe features)."""
    from wecolora.cache.admin import list_entries

    return list_entries(cache_dir)


def clear_cache(cache_dir: str | None = None, *, older_than_days: float | None = None,
                everything: bool = False) -> tuple[list, list]:
    """Delete cache entries no running process uses (``everything``, or those unused for ``older_than_days``);
    returns ``(removed, kept because in use)``."""
    from wecolora.cache.admin import clear_entries

    return clear_entries(cache_dir, older_than_days=older_than_days, everything=everything)
