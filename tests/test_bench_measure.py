"""Tests for wecolora.bench.measure: the helpers ``wecolora bench`` measures with (best round, seconds per
call, the machine's description, bf16 detection, peak memory)."""
import pytest
import torch

from wecolora.bench import measure

CPU = torch.device("cpu")


@pytest.mark.parametrize("rates, expected", [([1.0, 3.0, 2.0], 3.0), ([5.0], 5.0), ([0.5, 0.25], 0.5)])
def test_best_is_the_fastest_round(rates, expected):
    assert measure.best(rates) == expected


def test_time_calls_calls_the_function_and_returns_seconds_per_call():
    calls = []
    seconds = measure.time_calls(lambda: calls.append(sum(range(1000))), CPU, calls=7)
    assert len(calls) == 7
    assert isinstance(seconds, float) and seconds > 0


def test_time_calls_is_per_call(monkeypatch):
    clock = iter([10.0, 14.0])  # start, end: 4 s for 8 calls
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    assert measure.time_calls(lambda: None, CPU, calls=8) == 0.5


def test_machine_describes_the_cpu_and_the_libraries():
    info = measure.machine(CPU)
    for key in ("cpu", "cpu_count", "torch_threads", "cpu_bf16", "platform", "python", "device", "gpu",
                "bf16_peak_tflops", "load_average", "torch", "timm", "peft", "accelerate"):
        assert key in info, key
    assert info["device"] == "cpu" and info["gpu"] is None and info["bf16_peak_tflops"] is None
    assert info["torch_threads"] == torch.get_num_threads()
    assert set(info["cpu_bf16"]) <= {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"}
    assert isinstance(info["cpu"], str) and info["cpu"]


@pytest.mark.parametrize("flags, fast", [
    (["fpu", "sse2", "avx2"], False),
    (["avx512f", "avx512_bf16"], True),
    (["amx_bf16", "amx_tile"], True),
    ([], False),
])
def test_fast_bf16_on_the_cpu_reads_the_flags(monkeypatch, flags, fast):
    monkeypatch.setattr(measure, "_cpu_flags", lambda: flags)
    assert measure.fast_bf16(CPU) is fast


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA GeForce RTX 4090", 165.0),
    ("Tesla T4", None),
])
def test_bf16_peak_matches_the_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert measure.bf16_peak_tflops(torch.device("cuda")) == peak


def test_bf16_peak_on_the_cpu_is_unknown():
    assert measure.bf16_peak_tflops(CPU) is None


def test_peak_memory_on_the_cpu_sees_a_large_allocation():
    def allocate():
        x = torch.ones(4 * 2**20)  # 16 MB of float32
        return x.sum()

    assert 15.0 <= measure.peak_memory_mb(allocate, CPU) < 200.0


def test_sync_on_the_cpu_is_a_no_op():
    assert measure.sync(CPU) is None
