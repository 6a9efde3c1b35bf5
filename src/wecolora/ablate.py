"""Ablation grids: several distillations and probes from one preset, gathered into the paper's layout.

A preset (``presets/NAME.yaml`` or any YAML file) names a teacher, the distillation set, the probe
sets, settings shared by every student, and a list of runs (mode, reduction, ratio). Finished runs
and probes are reused, so an interrupted grid continues where it stopped.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .config import DistillConfig, load_yaml
from .errors import UserError
from .export import RUN_INFO
from .engine import csv_text
from .files import atomic_write_bytes, atomic_write_text

_logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).parent / "presets"
METHOD_NAMES = {"scratch-kd": "scratch KD", "weco-kd": "WeCo+KD", "lora-qv": "WeCo + plain LoRA",
                "wecolora": "WeCoLoRA", "teacher": "teacher", "copy": "weight copy, no training"}
CSV_COLUMNS = ("name", "method", "mode", "reduction", "ratio", "probe_data", "top1", "top5", "n_train", "n_test",
               "final_loss", "distill_seconds", "source")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@dataclass
class Ablation:
    """A grid of runs; see ``presets/demo.yaml`` for every field."""
    teacher: str
    distill_data: str
    probe_data: list[str]
    runs: list[dict]
    distill: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    reference: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.runs or not self.probe_data:
            raise UserError("an ablation needs at least one run and one probe set")
        unknown = sorted(set(self.reference) - {"teacher", "copy"})
        if unknown:
            raise UserError(f"unknown reference rows {unknown}; choose from teacher, copy")
        for run in self.runs:  # validate every run's settings before any work starts
            DistillConfig(teacher=self.teacher, data=self.distill_data, output="-", **{**self.distill, **run})


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


def run_name(run: dict) -> str:
    return f"{run['mode']}-r{run.get('reduction', 2)}-a{run.get('ratio', 0.01):g}"


def ablate(grid: Ablation, output: str | Path, *, device: str = "auto") -> list[dict]:
    """Run every distillation and probe of ``grid`` under ``output``; write report.md, results.csv, chart.png.

    Returns the result rows (one per model and probe set).
    """
    from .distill import distill
    from .distributed import join_processes
    from .evaluate import probe
    from .features import resolve_device

    state = join_processes(resolve_device(device))  # under torchrun the processes run the grid together
    output = Path(output)
    rows = []
    for name, method, source, folder, settings in _reference_models(grid, output, state):
        rows += [_probe_row(probe, name, method, source, folder, settings, data, grid, device)
                 for data in grid.probe_data]
    for run in grid.runs:
        run_dir = output / "runs" / run_name(run)
        if (run_dir / "adapter" / RUN_INFO).is_file():
            _logger.info("reusing finished run %s", run_dir)
            result = {"epochs": _read_summary(run_dir)}
        else:
            _logger.info("distilling %s", run_name(run))
            config = DistillConfig(teacher=grid.teacher, data=grid.distill_data, output=str(run_dir),
                                   **{"device": device, **grid.distill, **run},
                                   resume="auto" if (run_dir / "checkpoint").is_dir() else None)
            result = distill(config)
        settings = {**run, "final_loss": result["epochs"][-1]["loss"],
                    "distill_seconds": sum(float(e["seconds"]) for e in result["epochs"])}
        rows += [_probe_row(probe, run_name(run), METHOD_NAMES[run["mode"]], run_dir, run_dir, settings, data, grid,
                            device) for data in grid.probe_data]
    if state.is_main_process:
        write_report(rows, grid, output)
    return rows


def _reference_models(grid: Ablation, output: Path, state):
    """(name, method, model source, folder for its probes, settings) of the rows that need no training."""
    if "teacher" in grid.reference:
        yield "teacher", METHOD_NAMES["teacher"], grid.teacher, output / "reference" / "teacher", {}
    if "copy" in grid.reference:
        from .export import save_student
        from .student import build_student
        from .vit import load_model

        teacher = None
        for reduction in sorted({run.get("reduction", 2) for run in grid.runs}):
            folder = output / "reference" / f"copy-r{reduction}"
            if not (folder / "config.json").is_file():
                teacher = teacher or load_model(grid.teacher)
                if state.is_main_process:
                    save_student(build_student(teacher, reduction, mode="weco-kd"), folder)
                state.wait_for_everyone()  # written before any process probes it
            yield f"copy-r{reduction}", METHOD_NAMES["copy"], folder, folder, {"reduction": reduction}


def _probe_row(probe, name, method, source, folder: Path, settings, data, grid, device) -> dict:
    """Probe one model on one set (or reuse its results.json) and return its report row."""
    tag = Path(data).name if Path(data).exists() else data
    probe_dir = folder / f"probe-{tag}"
    results_file = probe_dir / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
    else:
        results = probe(str(source), data, str(probe_dir), device=device, **grid.probe)
    return {"name": name, "method": method, "mode": settings.get("mode", name.split("-")[0]),
            "reduction": settings.get("reduction"), "ratio": settings.get("ratio"), "probe_data": data,
            "top1": results["top1"], "top5": results.get("top5"), "n_train": results["n_train"],
            "n_test": results["n_test"], "final_loss": settings.get("final_loss"),
            "distill_seconds": settings.get("distill_seconds"), "source": str(probe_dir)}


def _read_summary(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def markdown_table(rows: list[dict], probe_data: list[str]) -> str:
    """The paper's Table A layout: one line per model, one linear-probe top-1 (%) column per probe set."""
    models = list(dict.fromkeys(row["name"] for row in rows))
    by_key = {(row["name"], row["probe_data"]): row for row in rows}
    header = ["alpha", "method", "r", *probe_data]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in models:
        first = by_key[(name, probe_data[0])]
        alpha = f"{first['ratio']:.0%}" if first["ratio"] else "-"
        scores = [f"{100 * by_key[(name, d)]['top1']:.1f}" for d in probe_data]
        reduction = str(first["reduction"]) if first["reduction"] else "-"
        lines.append("| " + " | ".join([alpha, first["method"], reduction, *scores]) + " |")
    return "\n".join(lines)


def write_report(rows: list[dict], grid: Ablation, output: Path) -> str:
    """report.md (table + each number's source), results.csv and chart.png under ``output``."""
    table = markdown_table(rows, grid.probe_data)
    sources = "\n".join(f"- {row['name']} on {row['probe_data']}: {row['source']}/results.json" for row in rows)
    text = (f"# Ablation: {grid.teacher} distilled on {grid.distill_data}\n\n"
            f"Linear-probe top-1 (%) of each frozen model; probe settings {grid.probe}; student settings "
            f"{grid.distill} plus each row's mode, reduction r and ratio alpha.\n\n{table}\n\n"
            f"## Sources\n\n{sources}\n")
    atomic_write_text(output / "report.md", text)
    atomic_write_text(output / "results.csv", csv_text(rows, CSV_COLUMNS))
    write_chart(rows, grid.probe_data, output / "chart.png")
    return table


def write_chart(rows: list[dict], probe_data: list[str], path: Path) -> None:
    """Grouped bar chart: one group per model, one bar per probe set."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("the bar chart needs matplotlib: pip install 'wecolora[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["name"] for row in rows))
    by_key = {(row["name"], row["probe_data"]): row for row in rows}
    width = 0.8 / len(probe_data)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(models)), 4))
    for i, data in enumerate(probe_data):
        ax.bar([m + i * width for m in range(len(models))], [100 * by_key[(n, data)]["top1"] for n in models],
               width, label=data)
    ax.set_xticks([m + width * (len(probe_data) - 1) / 2 for m in range(len(models))], models, rotation=45, ha="right")
    ax.set_ylabel("linear-probe top-1 (%)")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
