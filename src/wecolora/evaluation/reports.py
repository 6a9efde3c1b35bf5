"""``wecolora report``: gather several ``results.json`` into one markdown table and a CSV."""
from __future__ import annotations

import json
from pathlib import Path

from wecolora.errors import UserError
from wecolora.evaluation.splits import RESULTS
from wecolora.files import atomic_write_text, check_writable, csv_text

REPORT_COLUMNS = ("run", "model", "data", "task", "protocol", "pooling", "top1", "top5", "val_top1", "auc", "miou",
                  "pixel_accuracy", "n_train", "train_per_class", "n_test", "epochs", "k", "feature_dim",
                  "seconds")  # fmt: skip
PERCENT_COLUMNS = ("top1", "top5", "val_top1", "auc", "miou", "pixel_accuracy")
TEXT_COLUMNS = ("run", "model", "data", "task", "protocol", "pooling")


def report(run_dirs: list[str]) -> tuple[str, list[dict]]:
    """Gather several ``results.json`` into one markdown table (scores in %) and rows of raw values.

    Args:
        run_dirs: folders holding ``results.json`` (or the files themselves).

    Returns:
        ``(markdown table, rows)``; columns are those of :data:`REPORT_COLUMNS` that some run has.
    """
    if not run_dirs:
        raise UserError("give at least one run folder holding results.json")
    rows = []
    for run in run_dirs:
        path = Path(run) if Path(run).is_file() else Path(run) / RESULTS
        if not path.is_file():
            raise UserError(f"{path} does not exist: run 'wecolora probe' or 'wecolora knn' with --output {run} first")
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err}); rerun the evaluation") from err
        rows.append({"run": str(run), **{c: results[c] for c in REPORT_COLUMNS[1:] if results.get(c) is not None}})
    columns = [c for c in REPORT_COLUMNS if any(c in row for row in rows)]
    header = [f"{c} %" if c in PERCENT_COLUMNS else c for c in columns]
    align = ["---" if c in TEXT_COLUMNS else "---:" for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n", rows


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if column in PERCENT_COLUMNS:
        return f"{100 * value:.2f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value).replace("|", "\\|")


def write_report(run_dirs: list[str], output: str) -> str:
    """Write ``output/report.md`` and ``output/report.csv`` (raw fractions) from several runs; returns the markdown."""
    markdown, rows = report(run_dirs)
    columns = [c for c in REPORT_COLUMNS if any(c in row for row in rows)]
    out = check_writable(output)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.csv", csv_text(rows, columns, lineterminator="\n"))
    return markdown
