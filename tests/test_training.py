"""The training set-up distill and bench share (wecolora.train.setup)."""
import importlib.util

import torch

from wecolora.method.adapters import LeanLoRALinear
from wecolora.method.plan import plan_student
from wecolora.train.setup import compile_by_default, make_training


def test_make_training_sets_up_the_plans_student_as_distill_trains_it(teacher):
    plan = plan_student(teacher, 3, "first", "wecolora", 4)
    t = make_training(teacher, plan, lr=1e-3, weight_decay=0.05, epochs=4, warmup_epochs=1, updates_per_epoch=5,
                      device=torch.device("cpu"), precision="fp32")
    assert t.teacher_blocks == [plan.segment_ends[-1]] and t.student_blocks == [len(plan.kept) - 1] and not t.norm
    assert t.lean_adapters and isinstance(t.matcher.student.blocks[0].attn.qkv, LeanLoRALinear)
    trained = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in t.student.named_parameters() if "lora_" in n}  # only the adapters
    assert t.optimizer.param_groups[0]["lr"] == 0.0  # the warmup starts from 0
    tokens = t.matcher(torch.randn(2, 3, 16, 16))
    assert len(tokens) == 1 and tokens[0].shape[-1] == teacher.embed_dim


def test_torch_compile_is_on_by_default_only_with_cuda_and_triton(monkeypatch):
    assert not compile_by_default(torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    assert compile_by_default(torch.device("cuda"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not compile_by_default(torch.device("cuda"))
