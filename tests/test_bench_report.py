"""Tests for wecolora.bench.report: the table ``wecolora bench`` prints, from a hand-made result (every line,
its numbers and their formats; the share of the bf16 peak only where the device has a known peak)."""
import copy

import pytest

from wecolora.bench.report import format_table


def _row(images_per_s, speedup, gflop, tflops, peak_mb, **extra):
    return {"images_per_s": images_per_s, "speedup": speedup, "gflop_per_image": gflop, "tflops": tflops,
            "peak_mb": peak_mb, **extra}


RESULT = {
    "machine": {"cpu": "Test CPU", "torch_threads": 2, "cpu_count": 4, "device": "cpu", "gpu": None,
                "torch": "2.11.0", "bf16_peak_tflops": None},
    "teacher": "bundled", "teacher_blocks": 12, "width": 128, "rank": 32, "images": 512, "data": "fashion-mnist",
    "batch_size": 128, "config": {"rounds": 3}, "precisions": ["fp32"],
    "distill": {
        "reference": _row(1000.4, 1.0, 0.5, 0.5, 100.0),
        "fp32_cold_ceiling": _row(2100.0, 2.1, 0.4, 0.84, 80.0),
        "fp32_cold": _row(2000.0, 2.0, 0.4, 0.8, 81.25, of_ceiling=0.952),
        "fp32_warm_ceiling": _row(3100.0, 3.1, 0.2, 0.62, 40.0),
        "fp32_warm": _row(3000.0, 3.0, 0.2, 0.6, 41.0, of_ceiling=0.968),
    },
    "flops": {"batch": 128, "rank": 32, "wecolora_gflop_per_image": 0.3, "full_finetune_gflop_per_image": 0.45,
              "step_flops_ratio": 0.6667,
              "vit_b": {"rank": 128, "wecolora_gflop_per_image": 60.0, "full_finetune_gflop_per_image": 90.0,
                        "step_flops_ratio": 0.6667}},
    "inference": {
        "teacher": _row(5000.0, 1.0, 0.2, 1.0, 10.0, weights_mb=9.6),
        "adapters_r2": _row(7000.0, 1.4, 0.12, 0.84, 8.0, weights_mb=6.6),
        "merged_r2": _row(9500.0, 1.9, 0.1, 0.95, 6.0, weights_mb=4.8, limit=2.0),
        "adapters_r3": _row(9000.0, 1.8, 0.08, 0.72, 6.0, weights_mb=4.4),
        "merged_r3": _row(13000.0, 2.6, 0.067, 0.87, 4.0, weights_mb=3.3, limit=3.0),
    },
    "grid": {"precision": "fp32", "students": [
        {"mode": "wecolora", "reduction": 2, "seconds_without_cache": 10.0, "seconds_with_cache": 4.0, "cache": "filled"},
        {"mode": "weco-kd", "reduction": 3, "seconds_without_cache": 9.0, "seconds_with_cache": 3.0, "cache": "read"},
    ], "seconds_with_cache": 7.0, "seconds_without_cache": 19.0, "cost_ratio": 0.3684},
    "targets": {"distill_speedup_cold": {"target": 1.5, "at_most": False, "reached": True},
                "grid_cost_ratio": {"target": 0.5, "at_most": True, "reached": True},
                "infer_speedup_r2": {"target": 1.95, "at_most": False, "reached": False}},
    "distill_speedup_cold": 2.0, "grid_cost_ratio": 0.3684, "infer_speedup_r2": 1.9,
}


def test_the_header_names_the_machine_and_the_run():
    lines = format_table(RESULT).splitlines()
    assert lines[0] == "wecolora bench: Test CPU (2 threads, 4 cores), cpu, torch 2.11.0"
    assert lines[1] == ("teacher bundled (12 blocks, width 128), rank 32, 512 images of fashion-mnist, batch 128, "
                        "best of 3 interleaved rounds")


def test_the_distillation_lines():
    table = format_table(RESULT)
    lines = table.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("distillation, r=2")))
    assert lines[start].split() == ["distillation,", "r=2,", "all", "six", "adapters", "images/s", "vs", "ref", "of",
                                    "ceiling", "GFLOP/img", "TFLOP/s", "peak", "MB"]
    rows = lines[start + 1:start + 6]
    assert rows[0].startswith("  reference design (fp32, teacher every step)")
    assert rows[0].split()[-5:] == ["1000", "1.00x", "0.500", "0.500", "100.0"]
    assert rows[2].startswith("  wecolora fp32, teacher cache cold")
    assert rows[2].split()[-6:] == ["2000", "2.00x", "0.95", "0.400", "0.800", "81.2"]
    assert rows[4].startswith("  wecolora fp32, teacher cache warm") and "0.97" in rows[4]
    assert "of peak" not in table  # no known bf16 peak on this device


def test_the_share_of_the_bf16_peak_where_it_is_known():
    result = copy.deepcopy(RESULT)
    result["machine"].update(device="cuda:0", gpu="NVIDIA H200", bf16_peak_tflops=989.0)
    for row in result["distill"].values():
        row["fraction_of_bf16_peak"] = 0.125
    table = format_table(result)
    assert table.splitlines()[0].startswith("wecolora bench: Test CPU (2 threads, 4 cores), cuda:0 NVIDIA H200,")
    assert "of peak" in table and table.count("12.5%") == 5


def test_the_flops_inference_and_grid_lines():
    table = format_table(RESULT)
    assert "  this teacher, rank 32: 0.300 / 0.450 GFLOP = 0.667" in table
    assert "  ViT-B/16 224 px, rank 128: 60.000 / 90.000 GFLOP = 0.667" in table
    assert "inference, fp32, batch 128" in table
    assert "teacher (12 blocks)" in table
    assert "r=2 student, merged (limit 2.00x)" in table and "r=3 student, merged (limit 3.00x)" in table
    merged_r3 = next(line for line in table.splitlines() if "r=3 student, merged" in line)
    assert merged_r3.split()[-6:] == ["13000", "2.60x", "0.067", "0.870", "4.0", "3.3"]
    grid = table.splitlines()[table.splitlines().index("ablation grid, 6 students (fp32), training seconds per epoch:") + 1:]
    assert grid[0] == f"  {'wecolora r=2':<20} without cache  10.00   with the shared cache   4.00 (filled)"
    assert grid[1] == f"  {'weco-kd r=3':<20} without cache   9.00   with the shared cache   3.00 (read)"
    assert "  total 7.00 s vs 19.00 s: cost ratio 0.37" in table


@pytest.mark.parametrize("key, line", [
    ("distill_speedup_cold", "  distill_speedup_cold        2.00 (>= 1.5: reached)"),
    ("grid_cost_ratio", "  grid_cost_ratio             0.37 (<= 0.5: reached)"),
    ("infer_speedup_r2", "  infer_speedup_r2            1.90 (>= 1.95: NOT reached)"),
])
def test_the_targets(key, line):
    lines = format_table(RESULT).splitlines()
    assert line in lines
    assert lines.index("targets:") < lines.index(line)


def test_where_the_json_went():
    assert "written to" not in format_table(RESULT)
    table = format_table({**RESULT, "written_to": "benchmarks/results/bench-x.json"})
    assert table.splitlines()[-1] == "written to benchmarks/results/bench-x.json"
