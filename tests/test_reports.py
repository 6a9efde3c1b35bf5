"""Tests for wecolora.evaluation.reports: the markdown table and CSV ``wecolora report`` gathers from
several ``results.json`` (columns present in some run, scores in %, cells escaped, bad inputs refused)."""
import json

import pytest

from wecolora.errors import UserError
from wecolora.evaluation.reports import REPORT_COLUMNS, _cell, report, write_report


def _results(folder, **values):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(values))
    return str(folder)


@pytest.mark.parametrize("column, value, text", [
    ("top1", 0.81254, "81.25"),
    ("top5", 1.0, "100.00"),
    ("auc", 0.5, "50.00"),
    ("val_top1", 0.0, "0.00"),
    ("seconds", 12.345, "12.3"),
    ("n_train", 600, "600"),
    ("k", 20, "20"),
    ("model", "runs/a|b", "runs/a\\|b"),  # a pipe would split the markdown cell
    ("data", "mnist-5k", "mnist-5k"),
    ("top1", None, ""),
])
def test_cell(column, value, text):
    assert _cell(column, value) == text


def test_two_runs_with_different_columns(tmp_path):
    probe = _results(tmp_path / "probe", model="runs/s", data="mnist-5k", protocol="cached", pooling="cls",
                     top1=0.5, top5=0.9, n_train=100, n_test=50, epochs=3, seconds=1.25, feature_dim=None)
    knn = _results(tmp_path / "knn", model="bundled", data="mnist-5k", top1=0.75, n_train=100, n_test=50, k=20,
                   unknown_key="left out")
    markdown, rows = report([probe, knn])
    lines = markdown.splitlines()
    assert lines[0] == ("| run | model | data | protocol | pooling | top1 % | top5 % | n_train | n_test | epochs | "
                        "k | seconds |")
    assert lines[1] == "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == f"| {probe} | runs/s | mnist-5k | cached | cls | 50.00 | 90.00 | 100 | 50 | 3 |  | 1.2 |"
    assert lines[3] == f"| {knn} | bundled | mnist-5k |  |  | 75.00 |  | 100 | 50 |  | 20 |  |"
    assert len(lines) == 4 and markdown.endswith("\n")
    assert rows[1] == {"run": knn, "model": "bundled", "data": "mnist-5k", "top1": 0.75, "n_train": 100,
                       "n_test": 50, "k": 20}  # raw fractions, no unknown keys, no None values
    assert "feature_dim" not in rows[0]


def test_a_results_file_may_be_given_itself(tmp_path):
    folder = _results(tmp_path / "run", top1=0.25)
    _, rows = report([f"{folder}/results.json"])
    assert rows == [{"run": f"{folder}/results.json", "top1": 0.25}]


def test_write_report_writes_markdown_and_raw_csv(tmp_path):
    runs = [_results(tmp_path / "a", model="m", top1=0.8125, n_test=10), _results(tmp_path / "b", model="n", auc=0.7)]
    markdown = write_report(runs, str(tmp_path / "out" / "report"))
    assert (tmp_path / "out" / "report" / "report.md").read_text() == markdown
    assert (tmp_path / "out" / "report" / "report.csv").read_text() == (
        f"run,model,top1,auc,n_test\n{runs[0]},m,0.8125,,10\n{runs[1]},n,,0.7,\n")


@pytest.mark.parametrize("setup, words", [
    (lambda tmp: [], "give at least one run folder"),
    (lambda tmp: [str(tmp)], "does not exist: run 'wecolora probe' or 'wecolora knn'"),
    (lambda tmp: [str(tmp / "none")], "does not exist"),
])
def test_refused_inputs(tmp_path, setup, words):
    with pytest.raises(UserError, match=words):
        report(setup(tmp_path))


def test_a_damaged_results_file_is_refused(tmp_path):
    (tmp_path / "results.json").write_text('{"top1": 0.5')
    with pytest.raises(UserError, match="is not valid JSON"):
        report([str(tmp_path)])


def test_an_output_that_is_a_file_is_refused(tmp_path):
    run = _results(tmp_path / "run", top1=0.5)
    (tmp_path / "out").write_text("")
    with pytest.raises(UserError, match="exists and is not a folder"):
        write_report([run], str(tmp_path / "out"))


def test_the_columns_start_with_the_run():
    assert REPORT_COLUMNS[0] == "run" and len(set(REPORT_COLUMNS)) == len(REPORT_COLUMNS)
