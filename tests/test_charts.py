"""Tests for wecolora.grid.charts: chart.png of an ablation grid from its report cells (bars by (alpha, r), or
top-1 against the lr when the grid sweeps it)."""
import struct
import sys

import pytest

from wecolora.errors import UserError
from wecolora.grid import charts
from wecolora.grid.ablate import cell_scores


def _row(name, method, mode, top1, *, data="mnist-5k", reduction=2, ratio=0.01, seed=0, **extra):
    """A report row as grid.ablate._probe_row makes it (top-1 as a fraction)."""
    return {"name": name, "run": f"{name}-s{seed}", "method": method, "mode": mode, "reduction": reduction,
            "ratio": ratio, "seed": seed, "probe_data": data, "top1": top1, **extra}


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


@pytest.fixture
def bar_rows():
    return [
        _row("teacher", "teacher", "teacher", 0.90, reduction=None, ratio=None, seed=None),
        _row("copy-r2", "weight copy, no training", "copy", 0.60, ratio=None, seed=None),
        _row("wecolora-r2-a0.01", "WeCoLoRA", "wecolora", 0.80, seed=0),
        _row("wecolora-r2-a0.01", "WeCoLoRA", "wecolora", 0.82, seed=1),
        _row("weco-kd-r2-a0.01", "WeCo+KD", "weco-kd", 0.75),
        _row("scratch-kd-r3-a0.1", "scratch KD", "scratch-kd", 0.40, reduction=3, ratio=0.1),
    ]


def test_cells_are_mean_std_and_count_in_percent(bar_rows):
    cells = {c["name"]: c for c in cell_scores(bar_rows, ["mnist-5k"])}
    assert cells["wecolora-r2-a0.01"]["mean"] == pytest.approx(81.0)
    assert cells["wecolora-r2-a0.01"]["std"] == pytest.approx(2 ** 0.5)
    assert (cells["wecolora-r2-a0.01"]["n"], cells["teacher"]["n"], cells["teacher"]["std"]) == (2, 1, 0.0)


def test_bars_write_a_png(tmp_path, bar_rows, monkeypatch):
    drawn = []
    monkeypatch.setattr(charts, "_draw_sweep", lambda ax, cells: drawn.append("sweep"))
    real_bars = charts._draw_bars
    monkeypatch.setattr(charts, "_draw_bars", lambda ax, cells: (drawn.append("bars"), real_bars(ax, cells)))
    path = tmp_path / "deep" / "chart.png"
    charts.write_chart(cell_scores(bar_rows, ["mnist-5k"]), ["mnist-5k"], path, title="a grid")
    width, height = _png_size(path)
    assert width > 300 and height > 200
    assert drawn == ["bars"]
    assert not [p for p in path.parent.iterdir() if p.name != "chart.png"]  # no temporary file left


def test_one_panel_per_probe_set(tmp_path, bar_rows):
    two = bar_rows + [{**row, "probe_data": "fashion-mnist"} for row in bar_rows]
    charts.write_chart(cell_scores(bar_rows, ["mnist-5k"]), ["mnist-5k"], tmp_path / "one.png")
    charts.write_chart(cell_scores(two, ["mnist-5k", "fashion-mnist"]), ["mnist-5k", "fashion-mnist"],
                       tmp_path / "two.png")
    assert _png_size(tmp_path / "two.png")[0] > 1.5 * _png_size(tmp_path / "one.png")[0]


def test_an_lr_sweep_draws_lines(tmp_path, monkeypatch):
    rows = [_row(f"wecolora-r2-a0.01-lr{lr:g}", "WeCoLoRA", "wecolora", top1, lr=lr, seed=seed)
            for lr, top1 in ((1e-3, 0.70), (4e-3, 0.78), (1.6e-2, 0.74)) for seed in (0, 1)]
    rows.append(_row("teacher", "teacher", "teacher", 0.9, reduction=None, ratio=None, seed=None))
    drawn = []
    real_sweep = charts._draw_sweep
    monkeypatch.setattr(charts, "_draw_bars", lambda ax, cells: drawn.append("bars"))
    monkeypatch.setattr(charts, "_draw_sweep", lambda ax, cells: (drawn.append("sweep"), real_sweep(ax, cells)))
    charts.write_chart(cell_scores(rows, ["mnist-5k"]), ["mnist-5k"], tmp_path / "chart.png", settings=["lr"])
    assert drawn == ["sweep"]
    _png_size(tmp_path / "chart.png")


def test_an_lr_sweep_with_a_run_at_the_default_lr(tmp_path):
    rows = [_row("wecolora-lr0.001", "WeCoLoRA", "wecolora", 0.70, lr=1e-3),
            _row("wecolora-lr0.004", "WeCoLoRA", "wecolora", 0.75, lr=4e-3),
            _row("weco-kd", "WeCo+KD", "weco-kd", 0.60)]  # lr from --blr: no lr setting, so no 'lr' key
    charts.write_chart(cell_scores(rows, ["mnist-5k"]), ["mnist-5k"], tmp_path / "chart.png", settings=["lr"])
    _png_size(tmp_path / "chart.png")


LABEL_CASES = [
    # settings named, the cell's extra values, the bar's label
    ([], {}, "WeCoLoRA"),
    (["keep"], {"keep": "last"}, "WeCoLoRA, keep last"),
    (["rank", "lr"], {"rank": 8, "lr": 0.004}, "WeCoLoRA, rank 8, lr 0.004"),
    (["keep"], {"keep": None}, "WeCoLoRA"),  # a setting this cell leaves unset
]


@pytest.mark.parametrize("settings, extra, label", LABEL_CASES)
def test_bar_labels_name_the_varying_settings(tmp_path, monkeypatch, settings, extra, label):
    monkeypatch.setattr(charts, "_draw_bars", lambda ax, cells: None)
    cells = cell_scores([_row("w", "WeCoLoRA", "wecolora", 0.8, **extra)], ["mnist-5k"])
    charts.write_chart(cells, ["mnist-5k"], tmp_path / "chart.png", settings=settings)
    assert cells[0]["label"] == label


@pytest.mark.parametrize("cells, headroom, limits", [
    ([{"mean": 80.0, "std": 1.0}, {"mean": 90.0, "std": 2.0}], 4.0, (76.7, 96.0)),  # low 79, high 92
    ([{"mean": 2.0, "std": 1.0}, {"mean": 98.0, "std": 1.0}], 4.0, (0.0, 100.0)),  # clipped to [0, 100]
    ([{"mean": 50.0, "std": 0.0}], 1.0, (49.0, 51.0)),
])
def test_the_y_axis_starts_just_below_the_lowest_value(cells, headroom, limits):
    plt = charts._pyplot()
    fig, ax = plt.subplots()
    try:
        charts._tight_y(ax, cells, headroom)
        assert ax.get_ylim() == pytest.approx(limits)
    finally:
        plt.close(fig)


def test_without_matplotlib_the_chart_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(UserError, match=r"pip install 'wecolora\[report\]'"):
        charts.write_chart([], ["mnist-5k"], tmp_path / "chart.png")
    assert not (tmp_path / "chart.png").exists()


def test_every_method_has_a_colour_and_a_place():
    assert set(charts.METHOD_ORDER) == set(charts.METHOD_COLORS)
    from wecolora.grid.ablate import METHOD_NAMES

    trained = {name for mode, name in METHOD_NAMES.items() if mode not in ("teacher", "copy")}
    assert trained == set(charts.METHOD_ORDER)
