"""The reference design ``wecolora bench`` compares against: the authors' layout of the adapters and loop.

fp32, the teacher run at every step, one unfused low-rank module per projection added on top of the
frozen fused qkv and the other linears, as the paper's code does. Written here only to be measured.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from wecolora.method.losses import feature_loss
from wecolora.method.student import build_student
from wecolora.teachers.vit import last_block_tokens


class ReferenceLoRA(nn.Module):
    """The authors' layout: a frozen Linear plus its own unfused ``B(A(x))`` (two nn.Linear, no bias)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.a = nn.Linear(base.in_features, rank, bias=False)  # kaiming-uniform, as nn.Linear
        self.b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.b.weight)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


class ReferenceLoRAQKV(nn.Module):
    """The authors' qkv: the frozen fused Linear, then q, k, v updates added in place to their slices."""

    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__()
        self.qkv, self.dim = qkv, qkv.in_features
        self.a = nn.ModuleList(nn.Linear(self.dim, rank, bias=False) for _ in range(3))
        self.b = nn.ModuleList(nn.Linear(rank, self.dim, bias=False) for _ in range(3))
        for b in self.b:
            nn.init.zeros_(b.weight)

    def forward(self, x):
        qkv = self.qkv(x)  # [B, N, 3D]
        for i, (a, b) in enumerate(zip(self.a, self.b)):
            qkv[:, :, i * self.dim:(i + 1) * self.dim] += b(a(x))
        return qkv


def reference_student(teacher: nn.Module, reduction: int, rank: int) -> nn.Module:
    """The weight-copied student with the reference design's adapters on q, k, v, proj, fc1 and fc2."""
    student = build_student(teacher, reduction, mode="weco-kd").requires_grad_(False)
    for block in student.blocks:
        block.attn.qkv = ReferenceLoRAQKV(block.attn.qkv, rank)
        block.attn.proj = ReferenceLoRA(block.attn.proj, rank)
        block.mlp.fc1 = ReferenceLoRA(block.mlp.fc1, rank)
        block.mlp.fc2 = ReferenceLoRA(block.mlp.fc2, rank)
    return student


def reference_step(student, teacher, images, optimizer, teacher_blocks) -> None:
    """One step of the reference loop: the teacher's tokens, the student's, L1, AdamW."""
    with torch.no_grad():
        targets = last_block_tokens(teacher, images, teacher_blocks)
    loss = feature_loss(last_block_tokens(student, images), targets, "l1")["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reference_epoch(student, teacher, loader, optimizer, device, teacher_blocks) -> float:
    """One epoch of the reference loop over a per-image loader; returns images/s."""
    student.train()
    seen, start = 0, time.perf_counter()
    for images, _ in loader:
        reference_step(student, teacher, images.to(device, non_blocking=True), optimizer, teacher_blocks)
        seen += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)
