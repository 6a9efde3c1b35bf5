"""Charts of an ablation grid: bars by (alpha, r) with seed error bars, or probe top-1 against the lr.

Both take the report's cells (one per model and probe set: ``mean``, ``std``, ``n`` of top-1 or mIoU in %)
and draw one panel per probe set. The axis starts just below the lowest bar so that a 1-point
difference is visible, every bar carries its value, and the legend sits outside the data.
"""
from __future__ import annotations

import io
from pathlib import Path

from wecolora.errors import UserError
from wecolora.files import atomic_write_bytes

METHOD_ORDER = ("scratch KD", "WeCo+KD", "WeCo + plain LoRA", "WeCoLoRA")
METHOD_COLORS = {"scratch KD": "#9e9e9e", "WeCo+KD": "#1f77b4", "WeCo + plain LoRA": "#ff7f0e", "WeCoLoRA": "#2ca02c"}
REFERENCE_COLORS = ("#222222", "#6d4c41", "#a1887f", "#d7ccc8", "#8d6e63", "#bcaaa4", "#4e342e", "#9e9e9e")  # teacher, then the copies


def write_chart(cells: list[dict], probe_data: list[str], path: Path, *, settings: list[str] = (),
                title: str = "", ylabels: dict[str, str] | None = None) -> None:
    """chart.png: a line chart against the lr when the grid sweeps it, else grouped bars.

    ``settings`` names the run settings besides mode, r and alpha that vary in the grid (keep, rank...):
    they join the method in the bar labels. ``ylabels`` names each panel's score (default: linear-probe top-1).
    """
    plt = _pyplot()
    sweep = len({c["lr"] for c in cells if c.get("lr") is not None}) > 1
    for cell in cells:
        shown = [f"{k} {cell[k]:g}" if isinstance(cell[k], float) else f"{k} {cell[k]}"
                 for k in settings if cell.get(k) is not None and not (sweep and k == "lr")]
        cell["label"] = ", ".join([cell["method"], *shown])
    fig, axes = plt.subplots(1, len(probe_data), figsize=(6.5 * len(probe_data) + 2.5, 4.8), squeeze=False)
    for ax, data in zip(axes[0], probe_data):
        panel = [c for c in cells if c["probe_data"] == data]
        (_draw_sweep if sweep else _draw_bars)(ax, panel)
        ax.set_title(f"probe on {data}")
        ax.set_ylabel((ylabels or {}).get(data, "linear-probe top-1 (%)"))
        ax.grid(axis="y", alpha=0.3)
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("the chart needs matplotlib: pip install 'wecolora[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _is_reference(cell: dict) -> bool:
    return cell["method"] not in METHOD_COLORS


def _draw_bars(ax, cells: list[dict]) -> None:
    """Groups: the reference models, then one group per (alpha, r); one bar per method, error bar = std."""
    references = [c for c in cells if _is_reference(c)]
    trained = [c for c in cells if not _is_reference(c)]
    groups = ([("reference", references)] if references else []) + [
        (f"alpha {alpha:.0%}, r={r}", [c for c in trained if (c["ratio"], c["reduction"]) == (alpha, r)])
        for alpha, r in sorted({(c["ratio"], c["reduction"]) for c in trained})]
    labels = list(dict.fromkeys(c["label"] for c in trained))
    one_per_method = len(labels) == len({c["method"] for c in trained})
    palette = _palette(len(labels))
    bar_width, x, ticks = 0.8 / max(len(group) for _, group in groups), 0.0, []  # one width for every bar
    for label, group in groups:
        group = sorted(group, key=lambda c: (METHOD_ORDER.index(c["method"]) if c["method"] in METHOD_ORDER else -1,
                                             labels.index(c["label"]) if c["label"] in labels else -1))
        for i, cell in enumerate(group):
            position = x + (i - (len(group) - 1) / 2) * bar_width
            if _is_reference(cell):
                color, name = REFERENCE_COLORS[references.index(cell) % len(REFERENCE_COLORS)], _reference_label(cell)
            else:  # one colour per method, or per method and setting when a setting varies
                color = METHOD_COLORS[cell["method"]] if one_per_method else palette[labels.index(cell["label"])]
                name = cell["label"]
            ax.bar(position, cell["mean"], bar_width * 0.92, yerr=cell["std"] if cell["n"] > 1 else None,
                   capsize=3, color=color, label=name)
            ax.annotate(f"{cell['mean']:.1f}", (position, cell["mean"] + (cell["std"] if cell["n"] > 1 else 0)),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)
        ticks.append((x, label))
        x += 1.0
    ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks], rotation=15)
    _tight_y(ax, cells, headroom=4.0)


def _draw_sweep(ax, cells: list[dict]) -> None:
    """One line per (method, r, alpha) against the lr (log axis); reference models as horizontal lines."""
    trained = [c for c in cells if not _is_reference(c) and c.get("lr") is not None]
    for key in sorted({(c["method"], c["reduction"], c["ratio"], c["label"]) for c in trained},
                      key=lambda k: (METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER else -1, k[1], k[2], k[3])):
        line = sorted((c for c in trained if (c["method"], c["reduction"], c["ratio"], c["label"]) == key),
                      key=lambda c: c["lr"])
        method, r, alpha, label = key
        ax.errorbar([c["lr"] for c in line], [c["mean"] for c in line], yerr=[c["std"] for c in line], capsize=3,
                    marker="o", color=METHOD_COLORS.get(method), linestyle="-" if r == 2 else "--",
                    label=f"{label}, r={r}, alpha {alpha:.0%}")
    for i, cell in enumerate(c for c in cells if _is_reference(c)):
        ax.axhline(cell["mean"], color=REFERENCE_COLORS[i % len(REFERENCE_COLORS)], linestyle=":",
                   label=_reference_label(cell))
    for cell in (c for c in cells if not _is_reference(c) and c.get("lr") is None):  # a run at its default lr
        ax.axhline(cell["mean"], color=METHOD_COLORS.get(cell["method"]), linestyle="-." if cell["reduction"] == 2
                   else ":", label=f"{cell['label']}, r={cell['reduction']}, alpha {cell['ratio']:.0%}, default lr")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    _tight_y(ax, cells, headroom=1.0)


def _palette(n: int) -> list:
    import matplotlib

    colors = matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors
    return [colors[i % len(colors)] for i in range(n)]


def _reference_label(cell: dict) -> str:
    """``teacher``, or the untrained copy with its reduction and, for a narrower one, its widths and ranking."""
    if cell["method"] == "teacher":
        return "teacher"
    shape = [f"{k} {cell[k]}" for k in ("embed_dim", "mlp_hidden", "width_ranking") if cell.get(k) is not None]
    return f"weight copy r={cell['reduction']}{', ' + ', '.join(shape) if shape else ''} (untrained)"


def _tight_y(ax, cells: list[dict], headroom: float) -> None:
    """The y axis from just below the lowest value, so that 1-point differences are visible."""
    low = min(c["mean"] - c["std"] for c in cells)
    high = max(c["mean"] + c["std"] for c in cells)
    ax.set_ylim(max(0.0, low - 0.1 * (high - low) - 1.0), min(100.0, high + headroom))
