"""Ablation grids: several distillations and probes from one preset, gathered into the paper's layout.

A preset (``presets/NAME.yaml`` or any YAML file) names a teacher, the distillation set, the probe
sets (a name, or a mapping with ``data``, ``task`` and its own probe settings: see :func:`probe_sets`),
settings shared by every student, a list of runs (mode, reduction, ratio, and any other
distill setting such as lr or keep) and optionally ``seeds``: every run is then done once per seed
(training seed and few-shot subset seed together) and the report gives mean ± std over the seeds.
Finished runs and probes are reused, so an interrupted grid continues where it stopped. The runs share
the teacher cache (on for grid runs unless the grid sets ``teacher_cache: off``): one entry per teacher,
subset and seed, filled by the first student and read by the others.
"""
from __future__ import annotations

import csv
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from wecolora.config import DEFAULT_REDUCTION, WIDTH_FIELDS, DistillConfig, ProbeConfig, load_yaml
from wecolora.data.layout import is_segmentation_set
from wecolora.errors import UserError
from wecolora.export import RUN_INFO
from wecolora.files import atomic_write_text, csv_text
from wecolora.grid.charts import write_chart
from wecolora.train.run_folder import EXECUTION_SETTINGS, changed_settings

_logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).parent / "presets"
METHOD_NAMES = {"scratch-kd": "scratch KD", "weco-kd": "WeCo+KD", "lora-qv": "WeCo + plain LoRA",
                "wecolora": "WeCoLoRA", "teacher": "teacher", "copy": "weight copy, no training"}
NAMED_SETTINGS = ("mode", "reduction", "ratio")  # always in a run's name and in the table
SHORT_NAMES = {"reduction": "r", "ratio": "a", "seed": "s", "subset_seed": "subset", "warmup_epochs": "warmup",
               "embed_dim": "d", "heads": "h", "mlp_hidden": "mlp", "width_ratio": "w", "width_ranking": "",
               "width_loss": "", "latency_ms": "ms"}
CSV_COLUMNS = ("name", "run", "method", "mode", "reduction", "ratio", "seed", "probe_data", "metric", "top1", "top5",
               "auc", "miou", "pixel_accuracy", "n_train", "n_test", "optimizer", "probe_lr", "final_loss",
               "distill_seconds", "source")  # fmt: skip
METRIC_NAMES = {"top1": "linear-probe top-1", "auc": "linear-probe mean ROC-AUC", "miou": "segmentation-probe mIoU"}
# What a segmentation set takes from the grid's probe: section (the rest is the classification recipe).
SHARED_WITH_SEGMENTATION = ("seed", "num_workers", "extract_batch_size", "cache_dir", "max_unreadable")


@dataclass
class ProbeSet:
    """One probe set of a grid: its data, its probe's settings and its column in the report."""
    data: str
    config: ProbeConfig
    label: str  # the report's column (and the probe folder's name)

    @property
    def metric(self) -> str:
        return "miou" if self.config.task == "segmentation" else "top1"


def probe_sets(entries: list, shared: dict) -> list[ProbeSet]:
    """The grid's probe sets from its ``probe_data`` entries and its ``probe:`` section.

    An entry is a dataset name (a segmentation set, built-in or an image + mask folder, is recognised), or a
    mapping ``{data, task, label, <ProbeConfig settings>}``. A classification set takes the ``probe:``
    section with the entry's settings on top; a segmentation set takes only its seed, worker and cache
    settings (:data:`SHARED_WITH_SEGMENTATION`), with the entry's on top: the section's lr, epochs and
    train_per_class are the CLS probe's recipe.

    >>> [(p.label, p.metric) for p in probe_sets(["mnist-5k", {"data": "fashion-mnist-seg"}], {"lr": 4.0})]
    [('mnist-5k', 'top1'), ('fashion-mnist-seg', 'miou')]
    """
    from wecolora.evaluation.probe import probe_config

    sets = []
    for entry in entries:
        entry = {"data": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else None
        if entry is None or not isinstance(entry.get("data"), str):
            raise UserError(f"probe_data entries are dataset names or mappings with a data: key, not {entry!r}")
        data, label = entry.pop("data"), entry.pop("label", None)
        task = entry.setdefault("task", "segmentation" if is_segmentation_set(data) else "classification")
        base = shared if task == "classification" else {
            k: v for k, v in shared.items() if k in SHARED_WITH_SEGMENTATION}
        label = str(label) if label is not None else Path(data).name if Path(data).exists() else data
        sets.append(ProbeSet(data, probe_config(**{**base, **entry}), label))
    labels = [p.label for p in sets]
    twins = sorted({label for label in labels if labels.count(label) > 1})
    if twins:
        raise UserError(f"probe sets {', '.join(twins)} appear more than once; give each a distinct label")
    return sets


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@dataclass
class Ablation:
    """A grid of runs; see ``presets/demo.yaml`` for every field."""
    teacher: str
    distill_data: str
    probe_data: list  # dataset names, or mappings {data, task, label, probe settings}: see probe_sets
    runs: list[dict]
    distill: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    reference: list[str] = field(default_factory=list)
    seeds: list[int] | None = None  # each run once per seed (training and subset seed); None: as the settings say

    def __post_init__(self):
        if not self.runs or not self.probe_data:
            raise UserError("an ablation needs at least one run and one probe set")
        unknown = sorted(set(self.reference) - {"teacher", "copy"})
        if unknown:
            raise UserError(f"unknown reference rows {unknown}; choose from teacher, copy")
        for seeds in (self.seeds, *(run.get("seeds") for run in self.runs)):
            if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                                      or not all(isinstance(s, int) for s in seeds)):
                raise UserError(f"seeds {seeds!r} is invalid: expected a list of distinct integers like [0, 1, 2]")
        self.probe_sets = probe_sets(self.probe_data, self.probe)  # validated before any work starts
        names = [name for name, _ in self.planned_runs()]
        twins = sorted({name for name in names if names.count(name) > 1})
        if twins:
            raise UserError(f"the grid lists run(s) {', '.join(twins)} more than once with the same settings")
        for _, config in self.planned_runs():  # every run's settings are validated before any work starts
            DistillConfig(**config)

    def planned_runs(self) -> list[tuple[str, dict]]:
        """``(folder name, DistillConfig settings)`` of every run, once per seed.

        A folder is named by the mode, reduction and ratio, plus every other setting that differs
        between the grid's runs (``wecolora-r2-a0.01-lr0.004-s1``), so no two runs share a folder.
        """
        per_seed = []
        for run in self.runs:  # a run may give its own ``seeds`` (e.g. fewer for a costly row)
            run = dict(run)
            seeds = run.pop("seeds", self.seeds)
            per_seed += [dict(run)] if seeds is None else [{**run, "seed": s, "subset_seed": s} for s in seeds]
        settings = [{"teacher": self.teacher, "data": self.distill_data, "output": "-", **self.distill, **run}
                    for run in per_seed]
        varying = [k for k in dict.fromkeys(k for s in settings for k in s)
                   if k not in NAMED_SETTINGS and len({repr(s.get(k)) for s in settings}) > 1
                   and not (k == "subset_seed" and all(s.get(k) == s.get("seed") for s in settings))]
        return [(run_name(s, varying), s) for s in settings]


def run_name(settings: dict, varying: list[str] = ()) -> str:
    """``{mode}-r{reduction}-a{ratio}`` plus ``-{key}{value}`` for each setting in ``varying`` that the run gives
    (one it leaves at its default, None, adds nothing)."""
    name = f"{settings['mode']}-r{settings.get('reduction', 2)}-a{settings.get('ratio', 0.01):g}"
    for key in varying:
        value = settings.get(key)
        if value is None:
            continue
        text = f"{value:g}" if isinstance(value, float) else str(value)
        name += f"-{SHORT_NAMES.get(key, key.replace('_', '-'))}{text.replace(',', '_').replace('/', '_')}"
    return name


def load_ablation(preset: str | None = None, config_file: str | None = None, *, quick: bool = False,
                  **overrides) -> Ablation:
    """The grid from a preset name or a YAML file, with the ``quick`` section and overrides applied."""
    if (preset is None) == (config_file is None):
        raise UserError(f"give exactly one of --preset ({', '.join(presets())}) or --config FILE.yaml")
    if preset is not None and preset not in presets():
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(presets())}")
    values = load_yaml(PRESET_DIR / f"{preset}.yaml" if preset else config_file)
    quick_values = values.pop("quick", None)
    if quick:
        if quick_values is None:
            raise UserError("this preset has no quick variant")
        for key, value in quick_values.items():
            values[key] = {**values.get(key, {}), **value} if key in ("distill", "probe") else value
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Ablation(**values)
    except TypeError as err:
        raise UserError(f"invalid ablation settings: {err}") from None


def ablate(grid: Ablation, output: str | Path, *, device: str = "auto", shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run every distillation and probe of ``grid`` under ``output``; write report.md, results.csv, chart.png.

    Args:
        shard: ``(k, n)``: run only the runs ``k, k + n, k + 2n, ...`` (the reference rows in shard 0)
            and write no report, so that n processes or machines can share one grid folder; a last call
            without a shard reuses everything and writes the report.

    Returns:
        The result rows: one per model (and seed) and probe set.
    """
    from wecolora.distributed import join_processes
    from wecolora.evaluation.probe import probe
    from wecolora.runtime import resolve_device
    from wecolora.train.distill import distill

    index, shards = shard
    if not 0 <= index < shards:
        raise UserError(f"--shard {index}/{shards} is invalid: expected K/N with 0 <= K < N")
    state = join_processes(resolve_device(device))  # under torchrun the processes run the grid together
    output = Path(output)
    rows = []
    for name, method, source, folder, settings in _reference_models(grid, output, state) if index == 0 else ():
        rows += [_probe_row(probe, name, method, source, folder, settings, probe_set, grid, device)
                 for probe_set in grid.probe_sets]
    for folder_name, settings in grid.planned_runs()[index::shards]:
        run_dir = output / "runs" / folder_name
        config = DistillConfig(**{**settings, "device": device, "output": str(run_dir),
                                  "teacher_cache": grid_cache_policy(settings.get("teacher_cache")),
                                  "resume": "auto" if (run_dir / "checkpoint").is_dir() else None})
        if config.budget() is not None:  # one measurement per budget for the whole grid, kept in output/plans/
            from wecolora.bench.planner import resolve_budget

            name, value = config.budget()
            config, _ = resolve_budget(config, plan_file=output / "plans" / f"plan-{name}{value:g}.json", reuse=True)
        if (run_dir / "adapter" / RUN_INFO).is_file():
            changed = changed_settings(config, run_dir / "config.yaml", ignore=EXECUTION_SETTINGS)
            if changed:
                raise UserError(f"{run_dir} holds a finished run with other settings ({changed}); "
                                f"give the grid another --output")
            _logger.info("reusing finished run %s", run_dir)
            result = {"epochs": _read_summary(run_dir)}
        else:
            _logger.info("distilling %s", folder_name)
            result = distill(config)
        row_settings = {**settings, "run": folder_name, "final_loss": result["epochs"][-1]["loss"],
                        "distill_seconds": sum(float(e["seconds"]) for e in result["epochs"])}
        cell = run_name(settings, _cell_settings(grid))
        rows += [_probe_row(probe, cell, METHOD_NAMES[settings["mode"]], run_dir, run_dir, row_settings, probe_set,
                            grid, device) for probe_set in grid.probe_sets]
    if state.is_main_process and shards == 1:
        write_report(rows, grid, output)
    return rows


def grid_cache_policy(value) -> str | bool:
    """A grid run's teacher cache: on unless the grid (or a run) says otherwise. The grid's students share
    one teacher and subset (per seed), so the first one's cached tokens serve every later one.

    >>> grid_cache_policy(None), grid_cache_policy("auto"), grid_cache_policy(False), grid_cache_policy("off")
    ('on', 'on', False, 'off')
    """
    return "on" if value in (None, "auto") else value


def _cell_settings(grid: Ablation) -> list[str]:
    """The settings that name a report cell: those that vary across runs, the seeds aside."""
    runs = [{**grid.distill, **run} for run in grid.runs]
    return [k for k in dict.fromkeys(k for r in runs for k in r)
            if k not in (*NAMED_SETTINGS, "seeds") and len({repr(r.get(k)) for r in runs}) > 1]


def _reference_models(grid: Ablation, output: Path, state):
    """(name, method, model source, folder for its probes, settings) of the rows that need no training."""
    if "teacher" in grid.reference:
        yield "teacher", METHOD_NAMES["teacher"], grid.teacher, output / "reference" / "teacher", {}
    if "copy" in grid.reference:
        from wecolora.export import save_student
        from wecolora.teachers.load import load_model

        teacher = None
        for name, settings, run in _copies(grid):
            folder = output / "reference" / name
            if not (folder / "config.json").is_file():
                teacher = teacher or load_model(grid.teacher)
                if state.is_main_process:
                    save_student(_untrained_copy(grid, teacher, run, folder), folder)
                state.wait_for_everyone()  # written before any process probes it
            yield name, METHOD_NAMES["copy"], folder, folder, settings


def _copies(grid: Ablation) -> list[tuple[str, dict, dict]]:
    """``(name, report settings, a run's settings)`` of each distinct untrained copy the grid's runs start from: one
    per reduction (``copy-r2``), and for narrower students one per keep, widths and ranking (and ratio, whose subset
    the activation ranking looks at): ``copy-r2-d64-mlp256-activation``. Budget runs have no copy row."""
    copies = {}
    for run in grid.runs:
        settings = {"teacher": grid.teacher, "data": grid.distill_data, "output": "-", **grid.distill, **run}
        settings.pop("seeds", None)
        widths = {k: settings[k] for k in WIDTH_FIELDS if settings.get(k) is not None}
        if any(settings.get(k) is not None for k in ("speedup", "latency_ms", "params")):
            continue
        report = {"reduction": settings.get("reduction", DEFAULT_REDUCTION)}
        name = f"copy-r{report['reduction']}"
        if widths:
            ranking = settings.get("width_ranking", "activation")
            report.update(keep=settings.get("keep", "first"), **widths, width_ranking=ranking)
            if ranking == "activation":
                report["ratio"] = settings.get("ratio", 0.01)
            name += "".join(f"-{SHORT_NAMES.get(k, k)}{v:g}" if isinstance(v, float) else f"-{SHORT_NAMES.get(k, k)}{v}"
                            for k, v in widths.items()) + f"-{ranking}"
            if report["keep"] != "first":
                name += f"-keep{str(report['keep']).replace(',', '_')}"
        copies.setdefault(name, (name, report, settings))
    return list(copies.values())


def _untrained_copy(grid: Ablation, teacher, run: dict, folder: Path):
    """The weight copy a run starts from, untrained. A narrower one is planned as distill plans it (the activation
    ranking looks at the few-shot subset of the grid's first seed)."""
    from wecolora.distributed import OneProcess
    from wecolora.method.student import build_student, student_from_plan

    if not any(run.get(k) is not None for k in WIDTH_FIELDS):
        return build_student(teacher, run.get("reduction", DEFAULT_REDUCTION), mode="weco-kd")
    from wecolora.train.distill import choose_subset, make_plan, open_subset

    seed = (grid.seeds or [run.get("seed", 0)])[0]
    config = DistillConfig(**{**run, "mode": "weco-kd", "output": str(folder), "seed": seed, "subset_seed": seed})
    subset = open_subset(config)
    choose_subset(subset, teacher, "cpu")
    return student_from_plan(teacher, make_plan(config, teacher, subset.dataset, subset.indices, OneProcess()))


def _probe_row(probe, name, method, source, folder: Path, settings, probe_set: ProbeSet, grid, device) -> dict:
    """Probe one model on one set (or reuse its results.json) and return its report row."""
    probe_dir = folder / f"probe-{probe_set.label.replace('/', '_')}"
    results_file = probe_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not _reusable(results, probe_set.config):  # none, or from other settings
        results = probe(str(source), probe_set.data, str(probe_dir), probe_set.config, device=device)
    extra = {k: settings[k] for k in _cell_settings(grid) if k in settings}
    metric = result_metric(probe_set, results)
    return {"name": name, "run": settings.get("run", name), "method": method,
            "mode": settings.get("mode", name.split("-")[0]), "reduction": settings.get("reduction"),
            "ratio": settings.get("ratio"), "seed": settings.get("seed"), "probe_data": probe_set.label,
            "metric": metric, "score": results[metric], "top1": results.get("top1"),
            "top5": results.get("top5"), "auc": results.get("auc"), "miou": results.get("miou"),
            "pixel_accuracy": results.get("pixel_accuracy"),
            "n_train": results["n_train"], "n_test": results["n_test"], "optimizer": results.get("optimizer", "sgd"),
            "probe_lr": results.get("lr"), "final_loss": settings.get("final_loss"),
            "distill_seconds": settings.get("distill_seconds"), "source": str(probe_dir), **extra}


def result_metric(probe_set: ProbeSet, results: dict) -> str:
    """The score a probe's results are reported by: the probe set's (top-1, mIoU), or the mean ROC-AUC (``auc``)
    of a classification set with several labels an image (ChestX-ray14's column of the paper).

    >>> from wecolora.config import ProbeConfig
    >>> result_metric(ProbeSet("cxr.csv", ProbeConfig(), "cxr"), {"top1": 0.3, "auc": 0.7})
    'auc'
    """
    return "auc" if probe_set.metric == "top1" and results.get("auc") is not None else probe_set.metric


def _reusable(results: dict, config: ProbeConfig) -> bool:
    """Whether a saved ``results.json`` came from these probe settings (those that change its score).

    Results of wecolora 0.3 and before hold no task (classification) nor lr_source: their lr counts as
    given, so a probe with a fixed lr is reused and one whose lr a sweep now chooses is run again.
    """
    if not results:
        return False
    same = {"task": config.task, "optimizer": config.optimizer, "epochs": config.epochs, "seed": config.seed}
    if config.task == "classification":
        same.update(protocol=config.protocol, pooling=config.pooling, train_per_class=config.train_per_class)
    if config.img_size is not None:
        same["img_size"] = [config.img_size, config.img_size]
    recorded = {"task": "classification", **results}
    lr_matches = (recorded.get("lr") == config.lr if config.lr is not None
                  else recorded.get("lr_source") in ("rule", "sweep"))
    return lr_matches and all(recorded.get(key) == value for key, value in same.items())


def _read_summary(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def score(row: dict) -> float:
    """A result row's score in %: its ``score`` (the probe set's metric), else the mean ROC-AUC of a multi-label
    probe set (the paper's ChestX-ray14 column), else top-1."""
    if row.get("score") is not None:
        return 100 * row["score"]
    return 100 * (row["auc"] if row.get("auc") is not None else row["top1"])


def cell_scores(rows: list[dict], probe_data: list[str] | None = None) -> list[dict]:
    """One entry per report cell (model x probe set): its rows' score (top-1, mean ROC-AUC or mIoU, %;
    :func:`score`) mean, sample std and seed count. ``probe_data`` is not needed (kept for old callers)."""
    cells: dict[tuple, dict] = {}
    for row in rows:
        cell = cells.setdefault((row["name"], row["probe_data"]), {**row, "scores": []})
        cell["scores"].append(score(row))
    for cell in cells.values():
        scores = cell["scores"]
        cell["mean"], cell["n"] = statistics.fmean(scores), len(scores)
        cell["std"] = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return list(cells.values())


def markdown_table(rows: list[dict]) -> str:
    """The paper's Table A layout: one line per model, one column per probe set: linear-probe top-1 (%), the
    mean ROC-AUC (%) for a multi-label set (headed ``SET AUC``), or mIoU (%) for a segmentation set (its
    header says mIoU).

    Cells over several seeds read ``mean ± std`` (sample std); the last column gives the seed count
    (``-`` for the untrained reference rows).
    Settings that vary across the grid's runs besides mode, r and alpha (lr, keep, ...) get a column each.
    """
    cells = {(c["name"], c["probe_data"]): c for c in cell_scores(rows)}
    models = list(dict.fromkeys(row["name"] for row in rows))
    probe_data = list(dict.fromkeys(row["probe_data"] for row in rows))
    metrics = {row["probe_data"]: row.get("metric", "auc" if row.get("auc") is not None else "top1") for row in rows}
    extra = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in (*CSV_COLUMNS, "score")]
    suffix = {"miou": " mIoU", "auc": " AUC"}
    header = ["alpha", "method", "r", *extra, *(f"{d}{suffix.get(metrics[d], '')}" for d in probe_data), "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in models:
        first = cells[(name, probe_data[0])]
        alpha = f"{100 * first['ratio']:g}%" if first["ratio"] else "-"  # 1%, 10%, 0.2%
        reduction = str(first["reduction"]) if first["reduction"] else "-"
        settings = [f"{first[k]:g}" if isinstance(first.get(k), float) else str(first.get(k, "-")) for k in extra]
        scores = [_mean_std(cells[(name, d)]) for d in probe_data]
        seeds = "-" if first["mode"] in ("teacher", "copy") else str(first["n"])  # reference rows are not trained
        lines.append("| " + " | ".join([alpha, first["method"], reduction, *settings, *scores, seeds]) + " |")
    return "\n".join(lines)


def _mean_std(cell: dict) -> str:
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}" if cell["n"] > 1 else f"{cell['mean']:.1f}"


def write_report(rows: list[dict], grid: Ablation, output: Path) -> str:
    """report.md (table + each number's source), results.csv (one row per seed) and chart.png under ``output``."""
    table = markdown_table(rows)
    sources = "\n".join(f"- {row['run']} on {row['probe_data']}: {row['source']}/results.json" for row in rows)
    seeds = (f" Each trained row is the mean ± sample std over seeds {grid.seeds} (training and few-shot subset "
             f"seed together); the last column counts the seeds." if grid.seeds is not None else "")
    dense = [f"{p.label} ({_settings_text(p.config)})" for p in grid.probe_sets if p.metric == "miou"]
    dense = (f" Segmentation sets report the dense probe's mIoU (%): {'; '.join(dense)}." if dense else "")
    text = (f"# Ablation: {grid.teacher} distilled on {grid.distill_data}\n\n"
            f"Linear-probe top-1 (%) of each frozen model (mean ROC-AUC for a set marked AUC); probe settings "
            f"{grid.probe}.{dense} Student settings "
            f"{grid.distill} plus each row's mode, reduction r and ratio alpha.{seeds}\n\n{table}\n\n"
            f"## Sources\n\n{sources}\n")
    atomic_write_text(output / "report.md", text)
    extra = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in (*CSV_COLUMNS, "score")]
    atomic_write_text(output / "results.csv", csv_text(rows, (*CSV_COLUMNS, *extra)))
    labels = [p.label for p in grid.probe_sets]
    metric_of = {row["probe_data"]: row["metric"] for row in rows if row.get("metric")}
    write_chart(cell_scores(rows), labels, output / "chart.png", settings=extra,
                title=f"{grid.teacher} distilled on {grid.distill_data}",
                ylabels={p.label: f"{METRIC_NAMES[metric_of.get(p.label, p.metric)]} (%)" for p in grid.probe_sets})
    return table


def _settings_text(config: ProbeConfig) -> str:
    """The settings of a probe set that differ from the defaults, as ``key value`` pairs."""
    default = ProbeConfig(task=config.task)
    changed = [f"{f} {getattr(config, f)}" for f in ("epochs", "lr", "batch_size", "optimizer", "img_size", "seed")
               if getattr(config, f) != getattr(default, f)]
    return ", ".join(changed) or "defaults"
