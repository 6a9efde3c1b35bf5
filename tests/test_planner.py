"""Tests for wecolora.bench.planner (``wecolora plan`` and distill's shape budget). No timing is asserted: the
measurement itself is replaced by a FLOP-proportional latency where a test needs a deterministic choice."""
import json

import pytest
import yaml

from wecolora import api
from wecolora.bench import planner
from wecolora.cli import main
from wecolora.config import DistillConfig, PlanConfig
from wecolora.errors import UserError
from wecolora.method.width import TeacherWidth
from wecolora.teachers.load import load_model

from conftest import tiny_vit

REQUIRED = ("depth", "embed_dim", "heads", "mlp_hidden", "params", "flops", "latency_ms")


def test_default_widths_are_quarters_of_the_teachers():
    assert planner.candidate_widths(TeacherWidth(128, 4, 32, 512)) == ([32, 64, 96, 128], [128, 256, 384, 512])
    assert planner.candidate_widths(TeacherWidth(768, 12, 64, 3072)) == ([192, 384, 576, 768], [768, 1536, 2304, 3072])
    assert planner.candidate_widths(TeacherWidth(32, 4, 8, 128), [8, 32], [100]) == ([8, 32], [100])


def test_candidates_start_with_the_teacher_and_cover_depths_by_widths():
    teacher = tiny_vit()  # 6 blocks, width 32, 4 heads of 8, 128 neurons
    rows = planner.candidates(teacher, PlanConfig(teacher="t", reductions=[1, 2, 3, 4], embed_dims=[16, 32],
                                                  mlp_hiddens=[64, 128]))
    assert rows[0] == {"depth": 6, "reduction": 1, "embed_dim": 32, "heads": 4, "mlp_hidden": 128, "teacher": True}
    shapes = {(r["depth"], r["embed_dim"], r["mlp_hidden"]) for r in rows}
    assert len(shapes) == len(rows) == 3 * 2 * 2  # depths 6, 3, 2 (r = 3 and 4 both give 2)
    assert {r["depth"]: r["reduction"] for r in rows} == {6: 1, 3: 2, 2: 3}
    assert all(r["heads"] == r["embed_dim"] // 8 for r in rows)
    listed = planner.candidates(teacher, PlanConfig(teacher="t", keep="0,1,5", embed_dims=[32], mlp_hiddens=[128, 64]))
    assert [(r["depth"], r["mlp_hidden"]) for r in listed] == [(6, 128), (3, 128), (3, 64)]


def test_pareto_front_and_the_choice_under_each_budget():
    rows = [
        {"depth": 6, "embed_dim": 32, "mlp_hidden": 128, "latency_ms": 10.0, "params": 1000, "speedup": 1.0},
        {"depth": 3, "embed_dim": 32, "mlp_hidden": 128, "latency_ms": 5.0, "params": 500, "speedup": 2.0},
        {"depth": 6, "embed_dim": 16, "mlp_hidden": 64, "latency_ms": 5.5, "params": 300, "speedup": 1.8},
        {"depth": 2, "embed_dim": 16, "mlp_hidden": 64, "latency_ms": 2.0, "params": 100, "speedup": 5.0},
        {"depth": 3, "embed_dim": 16, "mlp_hidden": 128, "latency_ms": 4.0, "params": 500, "speedup": 2.5},
    ]
    assert planner.pareto_front(rows) == [True, False, False, True, True]
    assert planner.choose_shape(rows, ("speedup", 2.0)) is rows[4]  # 500 params at 4 ms beats 500 at 5 ms
    assert planner.choose_shape(rows, ("speedup", 3.0)) is rows[3]
    assert planner.choose_shape(rows, ("latency_ms", 5.5)) is rows[4]
    assert planner.choose_shape(rows, ("params", 400)) is rows[2]
    assert planner.choose_shape(rows, ("speedup", 6.0)) is None
    assert [planner.within(r, ("params", 500)) for r in rows] == [False, True, True, True, True]


def flop_latency(teacher, shapes, config, device, say):
    """A deterministic stand-in for the measurement: latency proportional to the counted FLOPs."""
    from wecolora.bench.flops import forward_flops
    from wecolora.method.student import count_parameters, merged_architecture
    from wecolora.method.width import StudentWidth

    rows = []
    for shape in shapes:
        meta = merged_architecture(teacher, shape["depth"], StudentWidth(shape["embed_dim"], shape["heads"],
                                                                       shape["mlp_hidden"]))
        flops = forward_flops(meta)
        rows.append({**shape, "params": count_parameters(meta), "flops": flops, "latency_ms": flops / 1e5,
                     "latency_min_ms": flops / 1e5, "throughput": 1.0, "peak_mb": None})
    return rows


def test_plan_measures_every_candidate_and_writes_the_table(teacher_dir, tmp_path, capsys):
    out = tmp_path / "plan"
    code = main(["plan", "--teacher", f"local-dir:{teacher_dir}", "--device", "cpu", "--batch-size", "2",
                 "--rounds", "1", "--calls", "2", "--warmup", "1", "--reductions", "3", "--embed-dims", "16", "32",
                 "--mlp-hiddens", "64", "--speedup", "1.5", "--output", str(out), "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 + 2
    for row in rows:
        assert all(key in row for key in REQUIRED)
        assert row["latency_ms"] > 0 and row["params"] > 0 and row["flops"] > 0 and row["peak_mb"] is not None
    assert rows[0]["teacher"] and rows[0]["speedup"] == 1.0
    assert any(row["pareto"] for row in rows)
    assert all(row["within_budget"] == (row["speedup"] >= 1.5) for row in rows)
    saved = json.loads((out / "plan.json").read_text())
    assert saved["candidates"] == rows and saved["budget"] == {"name": "speedup", "value": 1.5}
    assert (out / "plan.csv").read_text().count("\n") == len(rows) + 1
    assert (out / "chart.png").stat().st_size > 0


def test_plan_prints_the_front_and_the_choice(teacher_dir, monkeypatch, capsys):
    monkeypatch.setattr(planner, "measure", flop_latency)
    assert main(["plan", "--teacher", f"local-dir:{teacher_dir}", "--device", "cpu", "--reductions", "2",
                 "--embed-dims", "16", "32", "--mlp-hiddens", "128", "--speedup", "1.5"]) == 0
    text = capsys.readouterr().out
    assert "front (*)" in text and "(teacher)" in text and "<- chosen" in text
    assert "speedup 1.5: " in text and "distill would train depth 3, width 32 (4 heads), MLP 128" in text


@pytest.mark.slow
def test_plan_times_onnx_runtime_too(teacher_dir):
    pytest.importorskip("onnxruntime")
    result = api.plan(teacher=f"local-dir:{teacher_dir}", device="cpu", runtime="onnxruntime", batch_size=2, rounds=1,
                      calls=1, warmup=1, memory=False, reductions=[2], embed_dims=[32], mlp_hiddens=[128])
    assert result["runtime"] == "onnxruntime" and len(result["candidates"]) == 2
    assert all(row["latency_ms"] > 0 for row in result["candidates"])


def _distill_config(teacher_dir, output, **overrides):
    settings = dict(teacher=f"local-dir:{teacher_dir}", data="mnist-5k", output=str(output), ratio=0.02, epochs=2,
                    warmup_epochs=1, batch_size=16, accum_steps=1, num_workers=0, device="cpu", rank=4,
                    width_ranking="uniform")
    settings.update(overrides)
    return DistillConfig(**settings)


def test_distill_with_a_budget_trains_the_planned_shape_and_records_the_plan(teacher_dir, tmp_path, monkeypatch,
                                                                             caplog):
    monkeypatch.setattr(planner, "measure", flop_latency)
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="wecolora"):
        result = api.distill(_distill_config(teacher_dir, run, speedup=3.0))
    plan = json.loads((run / "plan.json").read_text())
    chosen = plan["chosen"]
    said = [r.getMessage() for r in caplog.records]  # the choice and why, before the first epoch's line
    choice = next(i for i, m in enumerate(said) if m.startswith(f"speedup 3: training depth {chosen['depth']}, "
                                                                  f"width {chosen['embed_dim']}"))
    assert planner.CHOICE_RULE in said[choice] and choice < next(i for i, m in enumerate(said) if "effective batch" in m)
    assert result["shape_budget"]["chosen"] == chosen and result["shape_budget"]["why"] == planner.CHOICE_RULE
    # the largest candidate at least 3x below the teacher's (FLOP-proportional) latency
    fitting = [r for r in plan["candidates"] if r["speedup"] >= 3.0]
    assert chosen["params"] == max(r["params"] for r in fitting) and chosen["speedup"] >= 3.0
    settings = yaml.safe_load((run / "config.yaml").read_text())["settings"]
    assert settings["speedup"] == 3.0
    assert (settings["reduction"], settings["embed_dim"], settings["mlp_hidden"]) == \
        (chosen["reduction"], chosen["embed_dim"], chosen["mlp_hidden"])
    assert len(result["kept_blocks"]) == chosen["depth"]
    # a resumed run reuses the recorded shape without measuring again
    monkeypatch.setattr(planner, "measure", lambda *a, **k: pytest.fail("measured again on resume"))
    resolved, again = planner.resolve_budget(_distill_config(teacher_dir, run, speedup=3.0, resume="auto"))
    assert again["chosen"] == chosen and resolved.embed_dim == chosen["embed_dim"]


def test_a_budget_no_candidate_meets_is_refused_with_the_best_one(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(planner, "measure", flop_latency)
    with pytest.raises(UserError, match=r"no candidate shape meets --speedup 1000 on cpu: the fastest measured is "
                                        r"depth 2, width 8, MLP 32"):
        api.distill(_distill_config(teacher_dir, tmp_path / "run", speedup=1000.0))
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_the_train_layer_refuses_an_unresolved_budget(teacher_dir, tmp_path):
    from wecolora.train.distill import distill

    with pytest.raises(UserError, match="resolved into a shape by wecolora.api.distill"):
        distill(_distill_config(teacher_dir, tmp_path / "run", params=1e5))


def test_inspect_shows_the_width_and_the_flops(teacher_dir, capsys):
    info = api.inspect(f"local-dir:{teacher_dir}", 2, embed_dim=16, mlp_hidden=64)
    assert (info["embed_dim"], info["heads"], info["head_dim"], info["mlp_hidden"]) == (16, 2, 8, 64)
    assert 0 < info["student_flops"] < info["teacher_flops"]
    full = api.inspect(f"local-dir:{teacher_dir}", 2)
    assert (full["embed_dim"], full["heads"], full["mlp_hidden"]) == (32, 4, 128)
    assert main(["inspect", "--teacher", f"local-dir:{teacher_dir}", "--width-ratio", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "width            16 channels, 2 heads of 8, MLP 64" in text and "FLOPs per image" in text


def test_the_planner_reads_weightless_teachers(teacher_dir):
    teacher = load_model(f"local-dir:{teacher_dir}", pretrained=False)
    rows = planner.candidates(teacher, PlanConfig(teacher="t"))
    assert len(rows) == 3 * 4 * 4  # depths 6, 3, 2; the teacher's shape is one of the depth-6 candidates
