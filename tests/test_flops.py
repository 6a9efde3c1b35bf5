"""Tests for wecolora.bench.flops: counted FLOPs of a training step, lean adapter path against a full fine-tune."""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from wecolora.bench.flops import step_flops, step_flops_ratio
from wecolora.method.student import build_student
from wecolora.teachers.load import load_model
from wecolora.teachers.vit import last_block_tokens


def test_step_flops_counts_a_step_and_writes_no_gradient(teacher):
    student = build_student(teacher, 2, mode="weco-kd")
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        targets = last_block_tokens(teacher, images)[0]
    forward = FlopCounterMode(display=False)
    with forward, torch.no_grad():
        last_block_tokens(student, images)
    step = step_flops(student, images, targets)
    assert 2.5 * forward.get_total_flops() < step < 3 * forward.get_total_flops()  # backward: about twice forward
    assert all(p.grad is None for p in student.parameters())


def _vit_b() -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)


# (teacher on the meta device, its input size, bound): counted at batch 128, where the step's batch-independent
# ΔW products weigh what they do in training; the meta device computes nothing.
RATIO_CASES = {
    "bundled": (lambda: load_model("bundled").to("meta"), 28, 0.95),  # width 128, rank 32
    "vit-b16": (_vit_b, 224, 0.9),  # width 768, rank 128
}


@pytest.mark.parametrize("case", RATIO_CASES)
def test_a_wecolora_step_costs_less_than_a_full_fine_tune(case):
    make, size, bound = RATIO_CASES[case]
    ratio = step_flops_ratio(make(), torch.empty(128, 3, size, size, device="meta"))
    assert 0.5 < ratio <= bound
