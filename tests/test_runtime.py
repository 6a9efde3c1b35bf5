"""Tests for wecolora.runtime: the per-iteration learning-rate schedule, the device and precision
choices, the loader's worker count and the versions recorded with a run."""
import math

import pytest
import torch

from wecolora.errors import UserError
from wecolora.runtime import DEVICES, loader_workers, make_accelerator, make_scheduler, resolve_device, versions

# epochs 4, warmup 1, 10 updates per epoch, peak 1.0: linear 0 -> 1 over updates 0..10, half-cosine to 0 over 10..40
SCHEDULE_CASES = [
    (0, 0.0),
    (1, 0.1),
    (5, 0.5),
    (9, 0.9),
    (10, 1.0),
    (20, 0.5 * (1 + math.cos(math.pi / 3))),  # 0.75
    (25, 0.5),
    (30, 0.5 * (1 + math.cos(2 * math.pi / 3))),  # 0.25
    (40, 0.0),
]


@pytest.mark.parametrize("step, lr", SCHEDULE_CASES)
def test_scheduler_warms_up_from_zero_then_decays_to_zero(step, lr):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(optimizer, epochs=4, warmup_epochs=1, updates_per_epoch=10)
    scheduler.step_update(step)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, abs=1e-9)


def test_scheduler_starts_at_zero_lr_before_any_update():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    make_scheduler(optimizer, epochs=3, warmup_epochs=1, updates_per_epoch=4)
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_scheduler_without_warmup_starts_at_the_peak():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    scheduler = make_scheduler(optimizer, epochs=2, warmup_epochs=0, updates_per_epoch=4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3)
    scheduler.step_update(4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.15)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_resolve_device_without_cuda(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(device) == torch.device("cpu")


def test_resolve_device_auto_takes_cuda_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device, message", [
    ("gpu", "--device 'gpu' is invalid: expected one of auto, cpu, cuda"),
    ("CPU", "is invalid"),
    ("cuda:0", "is invalid"),
    ("", "is invalid"),
    ("cuda", "no CUDA device is available"),
])
def test_resolve_device_refuses(monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=message):
        resolve_device(device)


def test_devices_are_the_configs():
    from wecolora import config

    assert DEVICES == config.DEVICES


@pytest.mark.parametrize("requested, expected", [(0, 0), (3, 3), (12, 12)])
def test_loader_workers_takes_the_request(requested, expected):
    assert loader_workers(requested) == expected


def test_loader_workers_default_is_the_threads_at_most_8(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert loader_workers(None) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)
    assert loader_workers(None) == 8


@pytest.mark.parametrize("device, precision, message", [
    ("cpu", "fp16", "fp16 needs a CUDA device"),
    ("cuda", None, "no CUDA device is available"),
])
def test_make_accelerator_refuses(monkeypatch, device, precision, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=message):
        make_accelerator(device, precision)


def test_make_accelerator_on_the_cpu_defaults_to_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    accelerator, precision = make_accelerator("cpu", None, accum_steps=3)
    assert precision == "fp32"
    assert accelerator.device.type == "cpu"
    assert accelerator.gradient_accumulation_steps == 3
    assert str(accelerator.mixed_precision) == "no"


def test_versions_names_the_libraries():
    import timm

    found = versions()
    assert set(found) == {"torch", "timm", "peft", "accelerate"}
    assert found["timm"] == timm.__version__ and found["torch"] == str(torch.__version__)
