"""Tests for wecolora.method.width: narrower students (channels, whole heads, MLP neurons), their rankings and
their sliced weights."""
import pytest
import timm
import torch

from wecolora.errors import UserError
from wecolora.export import save_student
from wecolora.method.adapters import merge
from wecolora.method.plan import plan_student
from wecolora.method.student import build_student, student_from_plan
from wecolora.method.width import (
    StudentWidth,
    TeacherWidth,
    WidthChoice,
    choose_width,
    head_rows,
    resolve_width,
    uniform_indices,
)
from wecolora.teachers.vit import last_block_tokens, mlp_ratio

from conftest import tiny_vit

T = TeacherWidth(embed_dim=48, heads=3, head_dim=16, mlp_hidden=192)  # the example: 3 heads of 16


def _randomize(model, seed=1):
    """Perturb every parameter so that a wrongly sliced tensor cannot hide behind timm's init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _images(model, batch=3, seed=0):
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Resolving the widths

RESOLVE_CASES = [
    # (settings, expected (embed_dim, heads, mlp_hidden))
    ({}, (48, 3, 192)),
    ({"embed_dim": 32}, (32, 2, 192)),  # the example: width 32 = 2 heads of 16
    ({"heads": 1}, (16, 1, 192)),
    ({"embed_dim": 32, "heads": 2}, (32, 2, 192)),
    ({"mlp_hidden": 100}, (48, 3, 100)),
    ({"embed_dim": 16, "mlp_hidden": 64}, (16, 1, 64)),
    ({"width_ratio": 0.5}, (32, 2, 96)),  # round(1.5) = 2 heads
    ({"width_ratio": 0.2}, (16, 1, 38)),  # at least one head
    ({"width_ratio": 1.0}, (48, 3, 192)),
]


@pytest.mark.parametrize("settings, expected", RESOLVE_CASES)
def test_resolve_width(settings, expected):
    width = resolve_width(T, **settings)
    assert (width.embed_dim, width.heads, width.mlp_hidden) == expected


REFUSED_WIDTHS = [
    ({"embed_dim": 40}, ("--embed-dim 40 does not fit the teacher (width 48, 3 heads of 16): whole heads are kept, so "
                         "choose a multiple of the head size 16 from 16 to 48")),
    ({"embed_dim": 64}, "--embed-dim 64 does not fit"),
    ({"embed_dim": 0}, "--embed-dim 0 is invalid: expected a positive integer"),
    ({"heads": 4}, "--heads 4 is more than the teacher's 3"),
    ({"heads": 0}, "--heads 0 is invalid"),
    ({"mlp_hidden": 193}, "--mlp-hidden 193 is more than the teacher's 192"),
    ({"mlp_hidden": 0}, "--mlp-hidden 0 is invalid"),
    ({"embed_dim": 32, "heads": 3}, ("--embed-dim 32 and --heads 3 disagree: heads keep the teacher's size 16, so give "
                                     "--embed-dim 48 with --heads 3, or --heads 2 with --embed-dim 32")),
    ({"width_ratio": 0.5, "heads": 1}, "--width-ratio 0.5 cannot be combined"),
    ({"width_ratio": 0.0}, "--width-ratio 0.0 is invalid"),
    ({"width_ratio": 1.5}, "--width-ratio 1.5 is invalid"),
]


@pytest.mark.parametrize("settings, message", REFUSED_WIDTHS)
def test_invalid_widths_are_refused_in_one_line(settings, message):
    with pytest.raises(UserError) as err:
        resolve_width(T, **settings)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_mlp_ratio_gives_timm_exactly_the_hidden_size():
    for dim in range(1, 200):
        for hidden in range(1, 800, 7):
            assert int(dim * mlp_ratio(dim, hidden)) == hidden, (dim, hidden)


# ---------------------------------------------------------------------------------------------
# The uniform ranking: Weight Selection's index rule


def weight_selection(wt: torch.Tensor, s_shape) -> torch.Tensor:
    """Weight Selection's ``uniform_element_selection`` (Xu et al., ICLR 2024), the branch where the student's size
    divides the teacher's, written from its code: evenly spaced elements along every dimension."""
    ws = wt.clone()
    for dim in range(wt.dim()):
        step = wt.shape[dim] // s_shape[dim]
        ws = torch.index_select(ws, dim, torch.arange(s_shape[dim]) * step)
    return ws


@pytest.mark.parametrize("n, k", [(12, 4), (12, 6), (12, 12), (768, 384), (3072, 1536), (128, 64), (4, 2), (4, 1),
                                  (512, 128)])
def test_uniform_equals_weight_selections_rule(n, k):
    assert uniform_indices(n, k) == weight_selection(torch.arange(n), (k,)).tolist()


def test_uniform_where_the_size_does_not_divide_takes_evenly_spaced_indices_within_range():
    # Weight Selection rounds linspace(0, n, k) there, whose last index n is out of range; linspace(0, n - 1, k)
    assert uniform_indices(10, 4) == [0, 3, 6, 9]
    assert uniform_indices(512, 96) == torch.linspace(0, 511, 96).round().long().tolist()
    for n in range(1, 40):
        for k in range(1, n + 1):
            got = uniform_indices(n, k)
            assert len(got) == k and len(set(got)) == k and got == sorted(got) and 0 <= got[0] and got[-1] < n


def test_uniform_choice_applies_the_rule_to_channels_heads_and_neurons():
    teacher = tiny_vit()  # width 32, 4 heads of 8, 128 neurons
    choice = choose_width(teacher, [0, 2, 4], StudentWidth(16, 2, 64), "uniform")
    assert choice.channels == tuple(range(0, 32, 2))
    assert choice.heads == ((0, 2),) * 3
    assert choice.neurons == (tuple(range(0, 128, 2)),) * 3


# ---------------------------------------------------------------------------------------------
# The activation ranking: Minitron's rules, on a teacher with planted dead units


def plant_dead(teacher, kept):
    """Kill 8 residual channels (LayerNorm outputs zero in every kept block), one head per kept block (its value
    rows zero: its output at the projection's input is zero) and 28 MLP neurons per kept block (fc1 rows and bias
    zero: GELU(0) = 0 at fc2's input). Returns what was killed."""
    dead_channels = [1, 4, 9, 13, 20, 22, 27, 31]
    dead_heads, dead_neurons = [], []
    attn_dim = teacher.blocks[0].attn.qkv.out_features // 3
    with torch.no_grad():
        for i, b in enumerate(kept):
            block = teacher.blocks[b]
            for norm in (block.norm1, block.norm2):
                norm.weight[dead_channels] = 0
                norm.bias[dead_channels] = 0
            head = (i + 1) % 4
            rows = [2 * attn_dim + r for r in head_rows((head,), 8)]  # v's rows of that head
            block.attn.qkv.weight[rows] = 0
            block.attn.qkv.bias[rows] = 0
            neurons = sorted({(5 * j + 3 * i) % 128 for j in range(28)})
            block.mlp.fc1.weight[neurons] = 0
            block.mlp.fc1.bias[neurons] = 0
            dead_heads.append(head)
            dead_neurons.append(neurons)
    return dead_channels, dead_heads, dead_neurons


def test_activation_ranking_drops_exactly_the_planted_dead_channels_heads_and_neurons():
    teacher = _randomize(tiny_vit(qkv_bias=True))
    kept = [0, 2, 4]
    dead_channels, dead_heads, dead_neurons = plant_dead(teacher, kept)
    choice = choose_width(teacher, kept, StudentWidth(24, 3, 100), "activation", _images(teacher, 16))
    assert choice.ranking == "activation" and choice.images == 16
    assert choice.channels == tuple(c for c in range(32) if c not in dead_channels)
    for i in range(len(kept)):
        assert choice.heads[i] == tuple(h for h in range(4) if h != dead_heads[i])
        assert len(dead_neurons[i]) == 28
        assert choice.neurons[i] == tuple(n for n in range(128) if n not in dead_neurons[i])


def test_activation_ranking_needs_images():
    with pytest.raises(UserError, match="activation width ranking looks at images"):
        plan_student(tiny_vit(), 2, embed_dim=16)


def test_a_choice_round_trips_through_its_record():
    teacher = _randomize(tiny_vit())
    choice = choose_width(teacher, [0, 3], StudentWidth(16, 2, 50), "activation", _images(teacher, 4))
    assert WidthChoice.from_record(choice.record()) == choice


# ---------------------------------------------------------------------------------------------
# The sliced student


def reference_narrow(teacher, kept, choice, width):
    """The sliced copy built by hand: a timm model of the student's shape whose every tensor is indexed from the
    teacher's modules (channels c, the kept heads' rows a, each of q/k/v's, the kept neurons n)."""
    args = dict(img_size=teacher.patch_embed.img_size, patch_size=teacher.patch_embed.patch_size,
                embed_dim=width.embed_dim, num_heads=width.heads, depth=len(kept),
                mlp_ratio=mlp_ratio(width.embed_dim, width.mlp_hidden))
    from wecolora.teachers.vit import architecture, model_args

    args = {**model_args(teacher), **args}
    student = timm.create_model(architecture(teacher), pretrained=False, **args).eval()
    c = list(choice.channels)
    t = teacher
    hd = t.blocks[0].attn.head_dim
    attn_dim = t.blocks[0].attn.qkv.out_features // 3
    with torch.no_grad():
        s = student
        for name in ("cls_token", "reg_token", "pos_embed"):
            if getattr(t, name, None) is not None:
                getattr(s, name).copy_(getattr(t, name)[..., c])
        s.patch_embed.proj.weight.copy_(t.patch_embed.proj.weight[c])
        if t.patch_embed.proj.bias is not None:  # CLIP's patch embedding has none
            s.patch_embed.proj.bias.copy_(t.patch_embed.proj.bias[c])
        for name in ("norm_pre", "norm", "fc_norm"):
            if isinstance(getattr(t, name), torch.nn.LayerNorm):
                getattr(s, name).weight.copy_(getattr(t, name).weight[c])
                getattr(s, name).bias.copy_(getattr(t, name).bias[c])
        if isinstance(t.head, torch.nn.Linear):
            s.head.weight.copy_(t.head.weight[:, c])
            s.head.bias.copy_(t.head.bias)
        for i, b in enumerate(kept):
            tb, sb = t.blocks[b], s.blocks[i]
            a = head_rows(choice.heads[i], hd)
            qkv = a + [attn_dim + r for r in a] + [2 * attn_dim + r for r in a]
            n = list(choice.neurons[i])
            for name in ("norm1", "norm2"):
                getattr(sb, name).weight.copy_(getattr(tb, name).weight[c])
                getattr(sb, name).bias.copy_(getattr(tb, name).bias[c])
            sb.attn.qkv.weight.copy_(tb.attn.qkv.weight[qkv][:, c])
            if tb.attn.qkv.bias is not None:
                sb.attn.qkv.bias.copy_(tb.attn.qkv.bias[qkv])
            for name in ("q_norm", "k_norm"):
                if isinstance(getattr(tb.attn, name), torch.nn.LayerNorm):
                    getattr(sb.attn, name).load_state_dict(getattr(tb.attn, name).state_dict())
            sb.attn.proj.weight.copy_(tb.attn.proj.weight[c][:, a])
            sb.attn.proj.bias.copy_(tb.attn.proj.bias[c])
            for name in ("ls1", "ls2"):
                if hasattr(getattr(tb, name), "gamma"):
                    getattr(sb, name).gamma.copy_(getattr(tb, name).gamma[c])
            sb.mlp.fc1.weight.copy_(tb.mlp.fc1.weight[n][:, c])
            sb.mlp.fc1.bias.copy_(tb.mlp.fc1.bias[n])
            sb.mlp.fc2.weight.copy_(tb.mlp.fc2.weight[c][:, n])
            sb.mlp.fc2.bias.copy_(tb.mlp.fc2.bias[c])
    return student


def _tiny(name, **overrides):
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=6, num_heads=4)
    args.update(overrides)
    torch.manual_seed(0)
    return _randomize(timm.create_model(name, pretrained=False, **args).eval())


FAMILIES = {
    "vit-qkv-bias": lambda: _tiny("vit_tiny_patch16_224", num_classes=10),
    "dinov2-reg-layerscale": lambda: _tiny("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=14),
    "clip-pre-norm": lambda: _tiny("vit_base_patch16_clip_224"),
    "no-cls-avg-pool": lambda: _tiny("vit_tiny_patch16_224", class_token=False, global_pool="avg", num_classes=10),
    "qk-norm": lambda: _tiny("vit_tiny_patch16_224", qk_norm=True, num_classes=10),
}
SHAPES = [StudentWidth(16, 2, 128), StudentWidth(32, 4, 50), StudentWidth(24, 3, 77)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ranking", ["activation", "uniform"])
def test_fresh_adapters_compute_exactly_the_sliced_copy(family, ranking):
    teacher = FAMILIES[family]()
    images = _images(teacher)
    for width in SHAPES:
        plan = plan_student(teacher, 2, "first", "wecolora", 4, embed_dim=width.embed_dim, mlp_hidden=width.mlp_hidden,
                            width_ranking=ranking, images=_images(teacher, 8, seed=1))
        student = student_from_plan(teacher, plan)
        reference = reference_narrow(teacher, list(plan.kept), plan.width_choice, width)
        with torch.no_grad():
            torch.testing.assert_close(student(images), reference(images), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(last_block_tokens(student, images)[0], last_block_tokens(reference, images)[0],
                                       atol=1e-6, rtol=1e-5)


def test_dropped_neurons_equal_a_teacher_copy_with_their_fc2_columns_zeroed():
    """At the teacher's residual width, fewer MLP neurons are exactly the copy with the others silenced."""
    teacher = _randomize(tiny_vit(qkv_bias=True))
    plan = plan_student(teacher, 2, "first", "weco-kd", mlp_hidden=40, width_ranking="activation",
                        images=_images(teacher, 8))
    student = student_from_plan(teacher, plan)
    silenced = build_student(teacher, 2, mode="weco-kd")
    with torch.no_grad():
        for i, block in enumerate(silenced.blocks):
            dropped = [j for j in range(128) if j not in plan.width_choice.neurons[i]]
            block.mlp.fc2.weight[:, dropped] = 0
    images = _images(teacher)
    with torch.no_grad():
        torch.testing.assert_close(student(images), silenced(images), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["wecolora", "lora-qv", "weco-kd", "scratch-kd"])
def test_every_mode_builds_the_narrow_shape(mode):
    teacher = _randomize(tiny_vit())
    student = build_student(teacher, 3, mode=mode, rank=4, embed_dim=16, mlp_hidden=48, width_ranking="uniform")
    plain = merge(student)
    assert (plain.embed_dim, plain.blocks[0].attn.num_heads, plain.blocks[0].mlp.fc1.out_features, len(plain.blocks)) \
        == (16, 2, 48, 2)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    if mode in ("wecolora", "lora-qv"):
        assert trainable and all("lora_" in n for n in trainable)  # the sliced copy is frozen
    else:
        assert "blocks.0.attn.qkv.weight" in trainable
    if mode == "scratch-kd":  # same shape, random: not the sliced copy
        copy = build_student(teacher, 3, mode="weco-kd", embed_dim=16, mlp_hidden=48, width_ranking="uniform")
        assert not torch.allclose(student.blocks[0].mlp.fc1.weight, copy.blocks[0].mlp.fc1.weight)


def _train_looking_adapters(student, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return student


def test_merge_and_the_saved_student_are_exact_and_load_with_timm_alone(tmp_path):
    teacher = _randomize(tiny_vit(qkv_bias=True))
    student = _train_looking_adapters(build_student(teacher, 2, rank=4, embed_dim=24, mlp_hidden=60,
                                                    width_ranking="activation", images=_images(teacher, 8)))
    plain = merge(student)
    save_student(plain, tmp_path / "student")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True).eval()  # timm alone
    assert (loaded.embed_dim, loaded.blocks[0].attn.num_heads, loaded.blocks[0].mlp.fc1.out_features) == (24, 3, 60)
    images = _images(teacher)
    with torch.no_grad():
        expected = student(images)
        assert not torch.allclose(expected, build_student(teacher, 2, mode="weco-kd", embed_dim=24, mlp_hidden=60,
                                                          width_ranking="activation",
                                                          images=_images(teacher, 8))(images), atol=1e-3)
        torch.testing.assert_close(plain(images), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(images), expected, atol=1e-5, rtol=1e-5)


def test_the_plan_records_the_width_and_refuses_a_record_that_does_not_fit():
    teacher = _randomize(tiny_vit())
    plan = plan_student(teacher, 2, embed_dim=16, width_ranking="uniform")
    record = plan.record()
    assert (record["embed_dim"], record["heads"], record["mlp_hidden"], record["rank"]) == (16, 2, 128, 4)
    assert record["width_selection"]["ranking"] == "uniform"
    assert record["width_selection"]["channels"] == list(range(0, 32, 2))
    assert plan_student(teacher, 2).record()["width_selection"] is None
    assert plan_student(teacher, 2, embed_dim=32, mlp_hidden=128).width_choice is None  # the teacher's widths
    other = choose_width(teacher, [0, 2, 4], StudentWidth(24, 3, 128), "uniform")
    with pytest.raises(UserError, match="recorded width choice does not fit"):
        plan_student(teacher, 2, embed_dim=16, width_choice=other)


def test_narrow_rank_is_checked_against_the_student_width():
    teacher = tiny_vit()
    assert plan_student(teacher, 2, embed_dim=16, width_ranking="uniform").rank == 4  # width / 4 of the student
    with pytest.raises(UserError, match="rank 20 does not fit the student's width 16"):
        plan_student(teacher, 2, rank=20, embed_dim=16, width_ranking="uniform")
