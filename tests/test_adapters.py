"""Tests for wecolora.method.adapters: split qkv, separate q/k/v adapters, merge and export of the merged model."""
import pytest
import timm
import torch
from torch import nn

import wecolora
from wecolora.errors import UserError
from wecolora.method.adapters import (
    TARGET_PATHS,
    LeanLoRALinear,
    SplitQKV,
    adapter_grad_flops,
    adapter_grads,
    add_adapters,
    fuse_qkv,
    grad_route,
    has_adapters,
    lean_student,
    split_qkv,
    target_regex,
)
from wecolora.method.blocks import select_blocks
from wecolora.method.student import build_student, count_parameters
from wecolora.teachers.vit import model_args

from conftest import tiny_vit

WIDTH = 32
ALL_TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _randomize_lora_b(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def _lora_layer(student: nn.Module, block: int, target: str) -> nn.Module:
    return student.get_base_model().get_submodule(f"blocks.{block}.{TARGET_PATHS[target]}")


def _block0_outputs(student: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the six adapted maps of block 0 (q, k, v read as slices of the split qkv output)."""
    block = student.get_base_model().blocks[0]
    seen = {}
    hooks = [
        block.attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o.detach().clone())),
        block.attn.proj.register_forward_hook(lambda m, i, o: seen.__setitem__("proj", o.detach().clone())),
        block.mlp.fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("fc1", o.detach().clone())),
        block.mlp.fc2.register_forward_hook(lambda m, i, o: seen.__setitem__("fc2", o.detach().clone())),
    ]
    with torch.no_grad():
        seen["output"] = student(images).detach().clone()
    for hook in hooks:
        hook.remove()
    qkv = seen.pop("qkv")  # [B, N, 3*D] in (q, k, v) order
    for i, name in enumerate(("q", "k", "v")):
        seen[name] = qkv[..., i * WIDTH:(i + 1) * WIDTH]
    return seen


# ---------------------------------------------------------------------------------------------
# SplitQKV

@pytest.mark.parametrize("bias", [True, False])
def test_split_qkv_equals_fused_and_fuse_round_trips(bias):
    torch.manual_seed(0)
    fused = nn.Linear(WIDTH, 3 * WIDTH, bias=bias)
    split = SplitQKV(fused)
    x = torch.randn(2, 5, WIDTH)
    torch.testing.assert_close(split(x), fused(x), atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.cat([split.q(x), split.k(x), split.v(x)], -1), split(x))
    assert torch.equal(split.k.weight, fused.weight[WIDTH:2 * WIDTH])
    back = split.fuse()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, fused.weight)
    if bias:
        assert torch.equal(back.bias, fused.bias)
    else:
        assert back.bias is None and split.q.bias is None
    assert torch.equal(back(x), fused(x))


def test_split_and_fuse_whole_model(teacher):
    images = _images()
    expected = teacher(images)
    split_qkv(teacher)
    assert all(isinstance(b.attn.qkv, SplitQKV) for b in teacher.blocks)
    torch.testing.assert_close(teacher(images), expected, atol=1e-6, rtol=1e-5)
    fuse_qkv(teacher)
    assert all(type(b.attn.qkv) is nn.Linear for b in teacher.blocks)
    assert torch.equal(teacher(images), expected)


def test_fuse_refuses_unmerged_adapters(teacher):
    student = build_student(teacher, 2, mode="wecolora", rank=4)
    with pytest.raises(RuntimeError, match="merge the adapters"):
        student.get_base_model().blocks[0].attn.qkv.fuse()


# ---------------------------------------------------------------------------------------------
# Adapters: where they sit, what they change

ADAPTED_CASES = [
    # (mode, targets wrapped by LoRA in every block)
    ("wecolora", {"q", "k", "v", "proj", "fc1", "fc2"}),
    ("lora-qv", {"q", "v"}),
]


@pytest.mark.parametrize("mode, targets", ADAPTED_CASES)
def test_adapters_sit_only_on_block_linears(teacher, mode, targets):
    student = build_student(teacher, 2, mode=mode, rank=4)
    wrapped = {name.removeprefix("base_model.model.") for name, m in student.named_modules()
               if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    expected = {f"blocks.{i}.{TARGET_PATHS[t]}" for i in range(3) for t in targets}
    assert wrapped == expected  # in particular patch_embed.proj and head are not wrapped


def test_fresh_adapters_change_nothing(teacher):
    images = _images()
    plain = build_student(teacher, 2, mode="weco-kd")
    for mode, _ in ADAPTED_CASES:
        student = build_student(teacher, 2, mode=mode, rank=4)
        assert all(torch.count_nonzero(p) == 0 for n, p in student.named_parameters() if "lora_B" in n)
        assert all(torch.count_nonzero(p) > 0 for n, p in student.named_parameters() if "lora_A" in n)
        torch.testing.assert_close(student(images), plain(images), atol=1e-6, rtol=1e-5)


# (target whose lora_B is set, block-0 maps that must change; all other maps must not)
EFFECT_CASES = [
    ("q", {"q", "proj", "fc1", "fc2"}),
    ("k", {"k", "proj", "fc1", "fc2"}),
    ("v", {"v", "proj", "fc1", "fc2"}),
    ("proj", {"proj", "fc1", "fc2"}),
    ("fc1", {"fc1", "fc2"}),
    ("fc2", {"fc2"}),
]


@pytest.mark.parametrize("target, changed", EFFECT_CASES)
def test_each_adapter_changes_its_own_map(teacher, target, changed):
    student = build_student(teacher, 2, mode="wecolora", rank=4)
    images = _images()
    before = _block0_outputs(student, images)
    layer = _lora_layer(student, 0, target)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(1))
    after = _block0_outputs(student, images)
    assert not torch.allclose(after["output"], before["output"], atol=1e-5), "the student's output did not change"
    for name in ALL_TARGETS:
        if name in changed:
            assert not torch.allclose(after[name], before[name], atol=1e-5), f"{name} did not change"
        else:
            assert torch.equal(after[name], before[name]), f"setting {target}'s B changed {name}"


@pytest.mark.parametrize("targets, per_block", [(("q", "k", "v"), 6), (("q", "v"), 4), (ALL_TARGETS, 18)])
def test_q_k_v_adapters_are_separate(targets, per_block):
    model = tiny_vit()
    rank = 4
    peft_model = add_adapters(model, targets, rank=rank, alpha=rank)
    assert count_parameters(peft_model, trainable_only=True) == per_block * WIDTH * rank * 6
    qkv = peft_model.get_base_model().blocks[0].attn.qkv
    assert isinstance(qkv, SplitQKV)
    params = []
    for t in ("q", "k", "v"):
        if t not in targets:
            assert type(getattr(qkv, t)) is nn.Linear
            continue
        layer = getattr(qkv, t)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape == (rank, WIDTH) and b.shape == (WIDTH, rank)  # each its own D-wide slice
        params += [a, b]
    assert len({p.data_ptr() for p in params}) == len(params)  # no shared storage


def test_paper_scaling_and_no_dropout(teacher):
    student = build_student(teacher, 2, mode="wecolora", rank=4)
    layer = _lora_layer(student, 1, "fc1")
    assert layer.scaling["default"] == 1.0
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    rs = build_student(teacher, 2, mode="wecolora", rank=4, use_rslora=True)
    assert _lora_layer(rs, 1, "fc1").scaling["default"] == pytest.approx(4 / 4 ** 0.5)


# ---------------------------------------------------------------------------------------------
# merge

MERGE_CASES = {
    # name: build_student keyword arguments
    "wecolora": dict(mode="wecolora"),
    "lora-qv": dict(mode="lora-qv"),
    "dora": dict(mode="wecolora", use_dora=True),
    "rslora": dict(mode="wecolora", use_rslora=True),
    "alpha": dict(mode="wecolora", alpha=8.0),
    "keep-last-r3": dict(mode="wecolora", reduction=3, keep="last"),
}


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_equals_adapter_student(teacher, case):
    kwargs = dict(MERGE_CASES[case])
    reduction = kwargs.pop("reduction", 2)
    student = build_student(teacher, reduction, rank=4, **kwargs)
    _randomize_lora_b(student)
    images = _images()
    with torch.no_grad():
        expected = student(images)
        expected_tokens = wecolora.teachers.vit.last_block_tokens(student, images)[0]
    before = {k: v.clone() for k, v in student.state_dict().items()}

    merged = wecolora.merge(student)

    assert type(merged) is timm.models.VisionTransformer
    assert len(merged.blocks) == len(select_blocks(6, reduction, kwargs.get("keep", "first")))
    assert all(type(b.attn.qkv) is nn.Linear and b.attn.qkv.out_features == 3 * WIDTH for b in merged.blocks)
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(teacher.state_dict()) - {
        k for k in teacher.state_dict() if k.startswith("blocks.") and int(k.split(".")[1]) >= len(merged.blocks)}
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(images), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(wecolora.teachers.vit.last_block_tokens(merged, images)[0], expected_tokens,
                                   atol=1e-4, rtol=1e-4)
    assert abs(merged(images) - build_student(teacher, reduction, mode="weco-kd", keep=kwargs.get("keep", "first"))(
        images)).max() > 1e-3  # the adapters did something that survived the merge

    # the student is untouched and still works as before
    assert has_adapters(student)
    assert isinstance(student.get_base_model().blocks[0].attn.qkv, SplitQKV)
    after = student.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(student(images), expected)


def test_merge_of_plain_student_is_a_copy(teacher):
    plain = build_student(teacher, 2, mode="weco-kd")
    merged = wecolora.merge(plain)
    assert merged is not plain and type(merged) is timm.models.VisionTransformer
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), plain.state_dict().values()))


def test_merge_refuses_non_finite_weights(teacher):
    student = build_student(teacher, 2, mode="wecolora", rank=4)
    _randomize_lora_b(student)
    with torch.no_grad():
        _lora_layer(student, 1, "v").lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="non-finite adapter weights"):
        wecolora.merge(student)
    assert isinstance(student.get_base_model().blocks[1].attn.qkv, SplitQKV)  # student untouched


def test_merged_model_round_trips_through_save_for_hf(teacher, tmp_path):
    student = build_student(teacher, 2, mode="wecolora", rank=4)
    _randomize_lora_b(student)
    merged = wecolora.merge(student).eval()
    folder = tmp_path / "m"
    timm.models.save_for_hf(merged, folder, safe_serialization=True, model_args=model_args(merged))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert len(reloaded.blocks) == 3
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), merged(images), atol=1e-5, rtol=1e-5)
    assert tuple(reloaded.pretrained_cfg["mean"]) == tuple(teacher.pretrained_cfg["mean"])


# ---------------------------------------------------------------------------------------------
# Refused settings

@pytest.mark.parametrize("rank", [0, -1, WIDTH + 1, 1000])
def test_impossible_rank(teacher, rank):
    with pytest.raises(UserError, match=f"rank {rank}"):
        build_student(teacher, 2, mode="wecolora", rank=rank)


@pytest.mark.parametrize("rank", [1, WIDTH])
def test_extreme_ranks_build(teacher, rank):
    student = build_student(teacher, 2, mode="lora-qv", rank=rank)
    assert count_parameters(student, trainable_only=True) == 4 * WIDTH * rank * 3


@pytest.mark.parametrize("targets", [("qkv",), ("q", "mlp"), ("head",)])
def test_unknown_target(targets):
    with pytest.raises(UserError, match="unknown adapter target"):
        add_adapters(tiny_vit(), targets, rank=4, alpha=4)
    with pytest.raises(UserError, match="choose from"):
        target_regex(targets)


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_impossible_dropout(dropout):
    with pytest.raises(UserError, match="dropout"):
        add_adapters(tiny_vit(), ALL_TARGETS, rank=4, alpha=4, dropout=dropout)


# ---------------------------------------------------------------------------------------------
# The lean training path: same function, same parameters, fused matmuls

LEAN_CASES = ["wecolora", "lora-qv", "rslora", "alpha", "keep-last-r3"]


def _assert_relative_close(got: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    """``|got - expected| <= tol · |expected|`` in the Frobenius norm, for a non-zero ``expected``."""
    assert expected.norm() > 0, f"{name}: the reference gradient is zero, the comparison would prove nothing"
    error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert error <= tol, f"{name}: relative error {error:.2e} > {tol:.0e}"


def _tokens_and_grads(student: nn.Module, model: nn.Module, images: torch.Tensor, weights: torch.Tensor):
    """Last-block tokens of ``model`` and the gradients of ``student``'s parameters of their weighted sum."""
    student.zero_grad(set_to_none=True)
    tokens = wecolora.teachers.vit.last_block_tokens(model, images)[0]
    (tokens * weights).sum().backward()
    return tokens.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", LEAN_CASES)
def test_lean_student_computes_the_same_tokens_and_gradients(teacher, case):
    kwargs = dict(MERGE_CASES[case])
    reduction = kwargs.pop("reduction", 2)
    student = build_student(teacher, reduction, rank=4, **kwargs).train()
    _randomize_lora_b(student)
    lean = lean_student(student)
    assert lean is not student and type(lean) is timm.models.VisionTransformer
    assert {id(p) for p in lean.parameters()} <= {id(p) for p in student.parameters()}  # shared, never copied
    assert all(isinstance(getattr(b.attn, "qkv"), LeanLoRALinear) for b in lean.blocks)
    images = _images(3)
    weights = torch.randn(3, 17, WIDTH, generator=torch.Generator().manual_seed(2))  # every token's gradient differs

    expected, expected_grads = _tokens_and_grads(student, student, images, weights)
    got, grads = _tokens_and_grads(student, lean, images, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert grads.keys() == expected_grads.keys() == trainable and all("lora_" in n for n in grads)
    for name in grads:
        _assert_relative_close(grads[name], expected_grads[name], 1e-5, name)
    # the peft student itself is untouched: still SplitQKV + peft layers, still fused attention as configured
    assert isinstance(student.get_base_model().blocks[0].attn.qkv, SplitQKV)


def test_lean_student_trains_base_weights_that_require_grad(teacher):
    student = build_student(teacher, 2, rank=4).train()
    _randomize_lora_b(student)
    base = student.get_base_model()
    base.blocks[0].mlp.fc1.base_layer.weight.requires_grad_(True)  # a single-slice layer
    base.blocks[1].attn.qkv.v.base_layer.bias.requires_grad_(True)  # one slice of q, k, v (k's bias has no effect)
    lean = lean_student(student)
    images = _images(3)
    weights = torch.randn(3, 17, WIDTH, generator=torch.Generator().manual_seed(2))
    _, expected_grads = _tokens_and_grads(student, student, images, weights)
    _, grads = _tokens_and_grads(student, lean, images, weights)
    assert grads.keys() == expected_grads.keys()
    assert {n for n in grads if "lora_" not in n} == {"base_model.model.blocks.0.mlp.fc1.base_layer.weight",
                                                      "base_model.model.blocks.1.attn.qkv.v.base_layer.bias"}
    for name in grads:
        _assert_relative_close(grads[name], expected_grads[name], 1e-5, name)


def test_lean_student_under_bf16_autocast_matches_the_peft_student(teacher):
    student = build_student(teacher, 2, rank=4).train()
    _randomize_lora_b(student)
    lean = lean_student(student)
    images = _images(3)
    weights = torch.randn(3, 17, WIDTH, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = _tokens_and_grads(student, student, images, weights)
        got, grads = _tokens_and_grads(student, lean, images, weights)
    assert got.dtype == expected.dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lean.blocks[0].mlp.fc1(torch.randn(2, WIDTH)).dtype == torch.bfloat16  # computed in autocast's dtype
    assert grads.keys() == expected_grads.keys() and all(g.dtype == torch.float32 for g in grads.values())
    _assert_relative_close(got, expected, 2e-2, "tokens")
    for name in grads:  # bf16 rounds differently along the two paths: a loose bound
        _assert_relative_close(grads[name], expected_grads[name], 5e-2, name)


# (module path in block 0, its input features, output features); attn.qkv holds the q, k and v slices
LEAN_LAYERS = [("attn.qkv", WIDTH, 3 * WIDTH), ("attn.proj", WIDTH, WIDTH), ("mlp.fc1", WIDTH, 4 * WIDTH),
               ("mlp.fc2", 4 * WIDTH, WIDTH)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [1, 4, WIDTH // 4, WIDTH])  # 51 tokens: the thin route up to rank 8, full at 32
@pytest.mark.parametrize("path, in_features, out_features", LEAN_LAYERS)
def test_lean_linear_equals_the_peft_layers(path, in_features, out_features, rank, bias):
    model = add_adapters(tiny_vit(depth=1, qkv_bias=bias, proj_bias=bias), ALL_TARGETS, rank=rank, alpha=rank)
    _randomize_lora_b(model)
    peft_layer = model.get_base_model().get_submodule(f"blocks.0.{path}")
    lean_layer = lean_student(model).get_submodule(f"blocks.0.{path}")
    assert isinstance(lean_layer, LeanLoRALinear) and bool(lean_layer.biases) == bias
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 17, in_features, generator=gen)
    grad_out = torch.randn(3, 17, out_features, generator=gen)

    def output_and_grads(layer):
        model.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        y = layer(inputs)
        y.backward(grad_out)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return y.detach(), dict(grads, input=inputs.grad)

    expected, expected_grads = output_and_grads(peft_layer)
    got, grads = output_and_grads(lean_layer)
    _assert_relative_close(got, expected, 1e-5, "output")
    assert grads.keys() == expected_grads.keys()
    assert len(grads) == 1 + 2 * (3 if path == "attn.qkv" else 1)  # the input, and each slice's A and B
    for name in grads:
        _assert_relative_close(grads[name], expected_grads[name], 1e-5, name)


@pytest.mark.parametrize("route", ["thin", "full"])
@pytest.mark.parametrize("in_features, out_features, rank", [(8, 24, 2), (24, 8, 5), (16, 16, 16)])
def test_adapter_grads_of_either_route_equal_autograd(route, in_features, out_features, rank):
    gen = torch.Generator().manual_seed(0)
    x, grad_out = torch.randn(40, in_features, generator=gen), torch.randn(40, out_features, generator=gen)
    a = torch.randn(rank, in_features, generator=gen, requires_grad=True)
    b = torch.randn(out_features, rank, generator=gen, requires_grad=True)
    (0.5 * x @ a.t() @ b.t()).backward(grad_out)
    da, db = adapter_grads(route, x, grad_out, a.detach(), b.detach(), 0.5)
    torch.testing.assert_close(da, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, b.grad, rtol=1e-5, atol=1e-5)
    assert adapter_grads(route, x, grad_out, a, b, 0.5, need_a=False)[0] is None
    assert adapter_grads(route, x, grad_out, a, b, 0.5, need_b=False)[1] is None


def test_grad_route_picks_the_cheaper_route():
    assert adapter_grad_flops(10, 4, 8, 2) == {"thin": 4 * 10 * 2 * (4 + 8),
                                                        "full": 2 * 10 * 8 * 4 + 4 * 8 * 4 * 2}
    vit_b_tokens = 128 * 197  # ViT-B/16 at 224 px, batch 128
    assert grad_route(vit_b_tokens, 768, 3072, 128) == "thin"  # fc1 at the paper's rank
    assert grad_route(vit_b_tokens, 3072, 768, 128) == "thin"  # fc2
    assert grad_route(vit_b_tokens, 768, 768, 768) == "full"  # rank = width: the thin products cost 4x
    assert grad_route(10, 768, 768, 768) == "thin"  # so few tokens that forming G costs more


def test_lean_student_follows_training_updates(teacher):
    student = build_student(teacher, 2, rank=4)
    lean = lean_student(student)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    images = _images()
    torch.testing.assert_close(lean(images), student(images), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(mode="wecolora", use_dora=True), dict(mode="wecolora", dropout=0.1),
                                    dict(mode="weco-kd")])
def test_lean_student_leaves_what_it_does_not_implement(teacher, kwargs):
    student = build_student(teacher, 2, rank=4, **kwargs)
    assert lean_student(student) is student


def test_lean_student_sees_base_weights_written_after_it_was_made(teacher):
    student = build_student(teacher, 2, rank=4)
    lean = lean_student(student)
    images = _images()
    lean(images)  # the fused frozen qkv weight is built here
    with torch.no_grad():  # e.g. a state dict loaded into the student afterwards
        student.get_base_model().blocks[0].attn.qkv.k.base_layer.weight.mul_(1.5)
        student.get_base_model().blocks[1].attn.qkv.v.base_layer.bias.add_(0.1)
    torch.testing.assert_close(lean(images), student(images), atol=1e-5, rtol=1e-4)


def test_torch_compile_traces_the_lean_backward(teacher):
    """distill compiles its training view by default on CUDA: dynamo must capture the custom backward in its
    graph and give the eager gradients (aot_eager: the same capture, without a C++ compiler)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from wecolora.train.setup import TokenMatcher

    torch._dynamo.reset()
    student = build_student(teacher, 2, rank=4).train()
    _randomize_lora_b(student)
    matcher = TokenMatcher(lean_student(student), [len(student.get_base_model().blocks) - 1], norm=False)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(matcher, backend=counter, dynamic=False)
    images = _images(3)
    weights = torch.randn(3, 17, WIDTH, generator=torch.Generator().manual_seed(2))

    def tokens_and_grads(model):
        student.zero_grad(set_to_none=True)
        tokens = model(images)[0]
        (tokens * weights).sum().backward()
        return tokens.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    expected, expected_grads = tokens_and_grads(matcher)
    got, grads = tokens_and_grads(compiled)
    assert counter.frame_count == 1 and counter.op_count > 0  # the forward went through dynamo, as one graph
    assert torch._dynamo.explain(matcher)(images).graph_break_count == 0  # CUDA graphs need an unbroken graph
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        _assert_relative_close(grads[name], expected_grads[name], 1e-5, name)
