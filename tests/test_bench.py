"""Smoke test of ``wecolora bench``'s code path on a tiny teacher (no timing is asserted), and of its reference design."""
import json

import pytest
import torch

import wecolora.bench.run as bench_run
from wecolora.bench.reference import reference_student
from wecolora.bench.report import format_table
from wecolora.bench.run import GRID, BenchConfig, run_bench
from wecolora.errors import UserError
from wecolora.method.student import build_student, count_parameters
from wecolora.teachers.vit import last_block_tokens

from conftest import tiny_vit


def test_the_reference_design_is_the_same_function_as_the_peft_student():
    teacher = tiny_vit(img_size=28, patch_size=7)
    student = build_student(teacher, 2, mode="wecolora", rank=4)
    reference = reference_student(teacher, 2, rank=4)
    images = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(last_block_tokens(reference, images)[0], last_block_tokens(student, images)[0])
    with torch.no_grad():  # copy the peft adapters into the reference layout: outputs must agree
        for ref_block, block in zip(reference.blocks, student.get_base_model().blocks):
            for i, name in enumerate("qkv"):
                layer = getattr(block.attn.qkv, name)
                layer.lora_B["default"].weight.normal_(std=0.1)
                ref_block.attn.qkv.a[i].weight.copy_(layer.lora_A["default"].weight)
                ref_block.attn.qkv.b[i].weight.copy_(layer.lora_B["default"].weight)
            for ref, layer in ((ref_block.attn.proj, block.attn.proj), (ref_block.mlp.fc1, block.mlp.fc1),
                               (ref_block.mlp.fc2, block.mlp.fc2)):
                layer.lora_B["default"].weight.normal_(std=0.1)
                ref.a.weight.copy_(layer.lora_A["default"].weight)
                ref.b.weight.copy_(layer.lora_B["default"].weight)
    torch.testing.assert_close(last_block_tokens(reference, images)[0], last_block_tokens(student, images)[0],
                               atol=1e-5, rtol=1e-4)
    trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert trainable == count_parameters(student, trainable_only=True)


def test_bench_runs_end_to_end_and_writes_its_json(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_run, "GRID", GRID[:2])  # two students keep the smoke test short
    config = BenchConfig(teacher=f"local-dir:{teacher_dir}", data="mnist-5k", device="cpu", precision="fp32",
                               batch_size=16, images=32, rounds=1, quick=True, output_dir=str(tmp_path))
    messages = []
    result = run_bench(config, progress=messages.append)
    for key in ("distill_speedup_cold", "distill_speedup_warm", "infer_speedup_r2", "infer_speedup_r3",
                "grid_cost_ratio"):
        assert result[key] > 0, key
    d = result["distill"]
    assert set(d) == {"reference", "fp32_cold", "fp32_warm", "fp32_cold_ceiling", "fp32_warm_ceiling"}
    assert all(row["peak_mb"] > 0 and row["tflops"] > 0 for row in d.values())
    for kind in ("cold", "warm"):  # a line and its ceiling run the same computation; only the data path differs
        assert d[f"fp32_{kind}"]["gflop_per_image"] == d[f"fp32_{kind}_ceiling"]["gflop_per_image"]
        assert result[f"{kind}_fraction_of_ceiling"] == pytest.approx(
            d[f"fp32_{kind}"]["images_per_s"] / d[f"fp32_{kind}_ceiling"]["images_per_s"])
    # cold = the teacher's forward + the student's step; the reference runs the same teacher and a heavier student
    assert d["fp32_warm"]["gflop_per_image"] < d["fp32_cold"]["gflop_per_image"] < d["reference"]["gflop_per_image"]
    flops = result["flops"]
    assert flops["step_flops_ratio"] == pytest.approx(flops["wecolora_gflop_per_image"]
                                                      / flops["full_finetune_gflop_per_image"])
    assert flops["step_flops_ratio"] < 1 and result["step_flops_ratio_vit_b"] < 0.9  # the adapters skip the full dW
    assert set(result["inference"]) == {"teacher", "adapters_r2", "merged_r2", "adapters_r3", "merged_r3"}
    assert result["inference"]["merged_r3"]["limit"] == 3.0  # 6 teacher blocks -> 2
    assert result["machine"]["torch_threads"] >= 1 and messages
    (written,) = tmp_path.glob("bench-*-quick.json")
    assert json.loads(written.read_text())["grid_cost_ratio"] == result["grid_cost_ratio"]
    table = format_table(result)
    assert "reference design" in table and "merged" in table and "grid_cost_ratio" in table
    assert "cold ceiling" in table and "step_flops_ratio" in table


def test_bench_config_refuses_nonsense():
    with pytest.raises(UserError, match="--rounds 0"):
        BenchConfig(rounds=0)
    with pytest.raises(UserError, match="precision"):
        BenchConfig(precision="fp16")
