"""Tests for wecolora.method.student: block selection, key remap, student construction and parameter counts."""
import pytest
import timm
import torch

import wecolora
from wecolora.errors import UserError
from wecolora.method.blocks import segment_ends, select_blocks
from wecolora.method.plan import MODES, default_rank, plan_student
from wecolora.method.student import build_student, count_parameters, describe, remap_block_keys
from wecolora.teachers.vit import last_block_tokens

from conftest import tiny_vit

COPY_MODES = [name for name, mode in MODES.items() if mode.copy_weights]
ADAPTER_MODES = [name for name, mode in MODES.items() if mode.adapter_targets is not None]
FULL_MODES = [name for name, mode in MODES.items() if mode.adapter_targets is None]


def _randomize(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Perturb every parameter so that a wrongly copied tensor cannot hide behind timm's init
    (zero biases, unit LayerNorms, tiny cls/reg tokens, 1e-5 LayerScale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _images(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _kept_teacher_features(teacher, images, kept):
    """The copied-block path, step by step: the teacher's own stem, only its kept blocks, its norm."""
    x = teacher.patch_embed(images)
    x = teacher._pos_embed(x)
    x = teacher.patch_drop(x)
    x = teacher.norm_pre(x)
    for i in kept:
        x = teacher.blocks[i](x)
    last = x
    return last, teacher.norm(x)


def _assert_copy_path(teacher, student, kept, images):
    last_ref, feats_ref = _kept_teacher_features(teacher, images, kept)
    close = dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(student.forward_features(images), feats_ref, **close)
    torch.testing.assert_close(student(images), teacher.forward_head(feats_ref), **close)
    (last,) = last_block_tokens(student, images)
    torch.testing.assert_close(last, last_ref, **close)
    (last_normed,) = last_block_tokens(student, images, norm=True)
    torch.testing.assert_close(last_normed, feats_ref, **close)


# ---------------------------------------------------------------------------------------------
# select_blocks / group_ends / remap_block_keys: literal cases

SELECT_CASES = [
    # (depth, reduction, keep, expected kept blocks)
    (12, 2, "first", [0, 2, 4, 6, 8, 10]),
    (12, 3, "first", [0, 3, 6, 9]),
    (12, 4, "first", [0, 4, 8]),
    (12, 2, "last", [1, 3, 5, 7, 9, 11]),
    (12, 3, "last", [2, 5, 8, 11]),
    (12, 4, "last", [3, 7, 11]),
    (24, 2, "first", list(range(0, 24, 2))),
    (6, 2, "last", [1, 3, 5]),
    (12, 1, "first", list(range(12))),
    (12, 5, "first", [0, 5, 10]),
    (12, 5, "last", [4, 9]),  # only full groups end inside the teacher
    (12, 2, [0, 5, 11], [0, 5, 11]),  # an explicit list is taken as given...
    (12, 99, [11, 0, 5], [0, 5, 11]),  # ...sorted, and the reduction is then ignored
    (12, 2, (3, 7), [3, 7]),
]


@pytest.mark.parametrize("keep", ["0,0,1,2,3,4", [3, 3, 7], (5, 1, 5)])
def test_a_kept_list_naming_a_block_twice_is_refused(keep):
    """``--keep 0,0,1,2,3,4`` once trained 5 blocks silently; it is refused with the list to give instead."""
    with pytest.raises(UserError, match=r"more than once: a block is kept once, so list each index once"):
        select_blocks(12, 2, keep)


@pytest.mark.parametrize("depth, reduction, keep, expected", SELECT_CASES)
def test_select_blocks(depth, reduction, keep, expected):
    assert select_blocks(depth, reduction, keep) == expected


def test_select_blocks_default_is_first():
    assert wecolora.select_blocks(12, 3) == [0, 3, 6, 9]


SELECT_ERRORS = [
    # (depth, reduction, keep, text the message must contain)
    (12, 0, "first", "reduction 0"),
    (12, 12, "first", "reduction 12"),
    (12, 13, "last", "reduction 13"),
    (12, -1, "first", "reduction -1"),
    (12, 2, "middle", "first, last, auto, greedy, influence"),
    (12, 2, [], "first, last, auto, greedy, influence"),
    (12, 2, "auto", "chooses blocks from images"),
    (12, 2, [-1, 3], "within 0..11"),
    (12, 2, [0, 12], "within 0..11"),
]


@pytest.mark.parametrize("depth, reduction, keep, message", SELECT_ERRORS)
def test_select_blocks_refuses(depth, reduction, keep, message):
    with pytest.raises(UserError, match=message):
        select_blocks(depth, reduction, keep)


GROUP_END_CASES = [
    # (depth, reduction, keep, expected teacher block each student block answers for)
    (12, 2, "first", [1, 3, 5, 7, 9, 11]),
    (12, 3, "first", [2, 5, 8, 11]),
    (12, 4, "first", [3, 7, 11]),
    (12, 2, "last", [1, 3, 5, 7, 9, 11]),
    (12, 3, "last", [2, 5, 8, 11]),
    (12, 4, "last", [3, 7, 11]),
    (10, 3, "first", [2, 5, 8, 9]),  # the last student block always answers for the last teacher block
    (10, 3, "last", [2, 5, 9]),
    (12, 5, "last", [4, 11]),
]


@pytest.mark.parametrize("depth, reduction, keep, expected", GROUP_END_CASES)
def test_segment_ends(depth, reduction, keep, expected):
    plan = plan_student(tiny_vit(depth), reduction, keep, mode="weco-kd")
    assert list(plan.segment_ends) == expected
    assert plan.segment_ends[-1] == depth - 1
    if depth % reduction == 0:  # student block i matches teacher block r*i + r - 1
        assert list(plan.segment_ends) == [reduction * i + reduction - 1 for i in range(len(plan.kept))]


SEGMENT_CASES = [
    # (depth, explicit kept list, expected segment ends): a kept block answers for the dropped blocks after it
    (12, [0, 5, 7], [4, 6, 11]),
    (12, [0, 3, 7, 11], [2, 6, 10, 11]),
    (12, [2, 5, 8, 11], [4, 7, 10, 11]),  # the list alone: the last rule's groups need keep="last"
    (6, [0, 1, 4], [0, 3, 5]),
    (6, [5], [5]),
]


@pytest.mark.parametrize("depth, kept, expected", SEGMENT_CASES)
def test_segment_ends_of_any_list(depth, kept, expected):
    plan = plan_student(tiny_vit(depth), 2, kept, mode="weco-kd")
    assert plan.keep == "list"
    assert list(plan.segment_ends) == expected == segment_ends(kept, depth)
    # every teacher block belongs to exactly one segment, which holds its kept block
    starts = [0] + [end + 1 for end in expected[:-1]]
    assert all(start <= k <= end for start, k, end in zip(starts, kept, expected))


def test_plan_resolves_rank_alpha_and_keep_once(teacher):
    plan = plan_student(teacher, 2, "0,3", "wecolora")
    assert (plan.kept, plan.rank, plan.alpha, plan.keep) == ((0, 3), default_rank(32), 8.0, "list")
    assert plan_student(teacher, 2, mode="weco-kd").rank is None
    assert plan_student(teacher, 2, rank=4, alpha=2.0).alpha == 2.0
    with pytest.raises(UserError, match=r"rank 33 .* 1 <= --rank <= 32"):
        plan_student(teacher, 2, rank=33)
    with pytest.raises(UserError, match="pass images="):
        plan_student(teacher, 2, "auto")


REMAP_CASES = [
    # (state-dict keys, kept, expected key -> original key)
    (["cls_token", "blocks.0.w", "blocks.1.w", "blocks.2.w", "norm.weight"], [0, 2],
     {"cls_token": "cls_token", "blocks.0.w": "blocks.0.w", "blocks.1.w": "blocks.2.w", "norm.weight": "norm.weight"}),
    (["blocks.1.attn.qkv.weight", "blocks.3.attn.qkv.weight", "blocks.10.mlp.fc1.bias", "blocks.11.mlp.fc1.bias"],
     [1, 3, 11],
     {"blocks.0.attn.qkv.weight": "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.weight": "blocks.3.attn.qkv.weight",
      "blocks.2.mlp.fc1.bias": "blocks.11.mlp.fc1.bias"}),
    # "blocks" must be the leading key component; other keys pass through untouched
    (["head.blocks.1.w", "patch_embed.proj.weight", "blocks.1"], [1],
     {"head.blocks.1.w": "head.blocks.1.w", "patch_embed.proj.weight": "patch_embed.proj.weight", "blocks.1": "blocks.1"}),
]


@pytest.mark.parametrize("keys, kept, expected", REMAP_CASES)
def test_remap_block_keys(keys, kept, expected):
    state = {key: torch.tensor(float(i)) for i, key in enumerate(keys)}
    remapped = remap_block_keys(state, kept)
    assert set(remapped) == set(expected)
    for new, old in expected.items():
        assert remapped[new] is state[old]


def test_remap_block_keys_teacher_state_dict(teacher):
    kept = [0, 3, 5]
    remapped = remap_block_keys(teacher.state_dict(), kept)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, **dict(wecolora.teachers.vit.model_args(teacher), depth=3))
    assert set(remapped) == set(plain.state_dict())
    assert torch.equal(remapped["blocks.2.mlp.fc2.weight"], teacher.blocks[5].mlp.fc2.weight)


# ---------------------------------------------------------------------------------------------
# Students: shape and equality with the copied-block path before training

BUILD_CASES = [(mode, keep, r) for mode in MODES for keep in ("first", "last") for r in (2, 3)]


@pytest.mark.parametrize("mode, keep, reduction", BUILD_CASES)
def test_student_keeps_the_selected_blocks(mode, keep, reduction):
    teacher = _randomize(tiny_vit())
    student = build_student(teacher, reduction, keep, mode, rank=4)
    kept = select_blocks(6, reduction, keep)
    assert len(student.blocks) == len(kept)
    assert not hasattr(student, "wecolora_kept_blocks")  # the plan, not the model, carries the kept list
    assert student.pretrained_cfg == teacher.pretrained_cfg
    assert len(teacher.blocks) == 6  # the teacher is not modified
    if mode in COPY_MODES:
        _assert_copy_path(teacher, student, kept, _images(teacher))


def test_build_student_leaves_teacher_untouched(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_student(teacher, 2, "first", "wecolora", rank=4)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_()
    student(_images(teacher))
    after = teacher.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(b.attn.qkv) is torch.nn.Linear for b in teacher.blocks)


def test_explicit_list_student_matches_those_blocks():
    teacher = _randomize(tiny_vit())
    student = build_student(teacher, keep=[1, 2, 5], mode="wecolora", rank=4)
    assert len(student.blocks) == 3
    _assert_copy_path(teacher, student, [1, 2, 5], _images(teacher))


def test_unknown_mode_lists_choices(teacher):
    with pytest.raises(UserError, match="wecolora, lora-qv, weco-kd, scratch-kd"):
        build_student(teacher, 2, mode="kd")


@pytest.mark.parametrize("reduction", [0, 6, 7])
def test_build_student_refuses_impossible_reduction(teacher, reduction):
    with pytest.raises(UserError, match=f"reduction {reduction}"):
        build_student(teacher, reduction)


# ---------------------------------------------------------------------------------------------
# What trains

@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_adapter_modes_train_only_adapters(teacher, mode):
    student = build_student(teacher, 2, "first", mode, rank=4)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    frozen = [n for n, p in student.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all("lora_" not in n for n in frozen)
    # every copied tensor is frozen, by name
    targets = MODES[mode].adapter_targets
    linears = [wecolora.method.adapters.TARGET_PATHS[t] + (".base_layer" if t in targets else "") + suffix
               for t in ("q", "k", "v", "proj", "fc1", "fc2") for suffix in (".weight", ".bias")]
    if "k" not in targets:  # q, k and v are split whenever any of them has an adapter
        assert not any(n.endswith("attn.qkv.weight") for n in frozen)
    for part in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight",
                 "norm.bias", "head.weight", "head.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                 *linears):
        hits = [n for n in frozen if n.endswith(part)]
        assert hits, f"no frozen parameter named *{part}"
    # and the number of frozen values is the whole copied student
    plain = build_student(teacher, 2, "first", "weco-kd")
    assert sum(p.numel() for p in student.parameters() if not p.requires_grad) == count_parameters(plain)


@pytest.mark.parametrize("mode", FULL_MODES)
def test_full_modes_train_everything(teacher, mode):
    student = build_student(teacher, 2, "first", mode)
    assert not wecolora.method.adapters.has_adapters(student)
    assert all(p.requires_grad for p in student.parameters())
    assert not any("lora_" in n for n, _ in student.named_parameters())
    assert count_parameters(student, trainable_only=True) == count_parameters(student)


def test_scratch_student_is_not_a_copy():
    teacher = _randomize(tiny_vit())
    student = build_student(teacher, 2, "first", "scratch-kd")
    copied = remap_block_keys(teacher.state_dict(), select_blocks(6, 2, "first"))
    state = student.state_dict()
    assert set(state) == set(copied)
    same = [k for k in state if torch.equal(state[k], copied[k])]
    assert not same, f"scratch-kd student copied {same}"
    images = _images(teacher)
    last_ref, _ = _kept_teacher_features(teacher, images, [0, 2, 4])
    assert not torch.allclose(last_block_tokens(student, images)[0], last_ref, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Parameter counts

COUNT_CASES = [
    # (mode, width, heads, rank, reduction, per-block factor of D*rank)
    ("wecolora", 32, 4, 4, 2, 18),
    ("wecolora", 32, 4, 8, 3, 18),
    ("wecolora", 48, 3, 12, 2, 18),
    ("lora-qv", 32, 4, 4, 2, 4),
    ("lora-qv", 48, 3, 12, 3, 4),
]


@pytest.mark.parametrize("mode, width, heads, rank, reduction, factor", COUNT_CASES)
def test_trainable_count(mode, width, heads, rank, reduction, factor):
    teacher = tiny_vit(embed_dim=width, num_heads=heads)
    student = build_student(teacher, reduction, "first", mode, rank=rank)
    kept = len(select_blocks(6, reduction, "first"))
    assert count_parameters(student, trainable_only=True) == factor * width * rank * kept
    plain = build_student(teacher, reduction, "first", "weco-kd")
    assert count_parameters(student) == count_parameters(plain) + factor * width * rank * kept


def test_default_rank():
    assert default_rank(768) == 128
    assert default_rank(384) == 96
    assert default_rank(32) == 8
    assert default_rank(2) == 1


def test_describe_tiny(teacher):
    info = describe(teacher, 3, "last", "wecolora", rank=4)
    assert info["kept_blocks"] == [2, 5]
    assert info["teacher"] == "vit_tiny_patch16_224"
    assert info["trainable_params"] == 18 * 32 * 4 * 2
    assert info["merged_params"] == count_parameters(build_student(teacher, 3, "last", "weco-kd"))
    assert info["student_params"] == info["merged_params"] + info["trainable_params"]
    assert describe(teacher, 2, mode="weco-kd")["rank"] is None


@pytest.fixture(scope="module")
def vit_base():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize("reduction, trainable, merged", [(2, 10_616_832, 44_040_424), (3, 7_077_888, None)])
def test_describe_vit_base_matches_the_paper(vit_base, reduction, trainable, merged):
    info = describe(vit_base, reduction, rank=128)
    assert info["trainable_params"] == trainable == 13_824 * 128 * (12 // reduction)
    assert info["teacher_params"] == 86_567_656
    if merged is not None:
        assert info["merged_params"] == merged


# ---------------------------------------------------------------------------------------------
# Supported and refused families

def _tiny(name, **overrides):
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=6, num_heads=4)
    args.update(overrides)
    torch.manual_seed(0)
    return _randomize(timm.create_model(name, pretrained=False, **args).eval())


FAMILY_CASES = {
    # name: (teacher factory, what makes it special)
    "dinov2-reg-layerscale": lambda: _tiny("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=14),
    "clip-pre-norm": lambda: _tiny("vit_base_patch16_clip_224"),
    "no-cls-avg-pool": lambda: _tiny("vit_tiny_patch16_224", class_token=False, global_pool="avg", num_classes=10),
    "deit": lambda: _tiny("deit_tiny_patch16_224", num_classes=10),
}


@pytest.mark.parametrize("family", FAMILY_CASES)
@pytest.mark.parametrize("mode", COPY_MODES)
def test_supported_families(family, mode):
    teacher = FAMILY_CASES[family]()
    if family.startswith("dinov2"):
        assert teacher.num_reg_tokens == 4 and type(teacher.blocks[0].ls1).__name__ == "LayerScale"
    if family == "clip-pre-norm":
        assert isinstance(teacher.norm_pre, torch.nn.LayerNorm)
    if family == "no-cls-avg-pool":
        assert teacher.cls_token is None and teacher.global_pool == "avg"
    student = build_student(teacher, 2, "last", mode, rank=4)
    assert len(student.blocks) == 3
    _assert_copy_path(teacher, student, [1, 3, 5], _images(teacher))


REFUSED_CASES = {
    "eva02": lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28),
    "resnet": lambda: timm.create_model("resnet18", pretrained=False),
}


@pytest.mark.parametrize("family", REFUSED_CASES)
def test_refused_families(family):
    model = REFUSED_CASES[family]()
    with pytest.raises(UserError, match="supported: timm VisionTransformer"):
        build_student(model, 2)
