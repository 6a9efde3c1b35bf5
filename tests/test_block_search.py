"""Tests for wecolora.method.block_search (--keep auto|greedy|influence) and the single StudentPlan it feeds."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

import wecolora
from wecolora.config import KEEP_SEARCHES, DistillConfig, parse_keep
from wecolora.errors import UserError
from wecolora.method.block_search import (
    block_influence,
    choose_blocks,
    embed,
    greedy_removal,
    initial_l1,
    most_influential,
    split_images,
    teacher_tokens,
)
from wecolora.method.plan import default_rank, plan_student
from wecolora.method.student import build_student, describe
from wecolora.teachers.vit import last_block_tokens
from wecolora.train.distill import distill

from conftest import interrupted_after_first_checkpoint, tiny_vit

SRC = Path(wecolora.__file__).parent


def _teacher(depth: int = 6, seed: int = 1) -> torch.nn.Module:
    """A tiny ViT whose blocks differ clearly (timm's init makes every residual branch nearly zero)."""
    model = tiny_vit(depth)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _images(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _make_identity(teacher: torch.nn.Module, block: int) -> None:
    """Zero the residual branches of one block: it then returns its input unchanged."""
    with torch.no_grad():
        for linear in (teacher.blocks[block].attn.proj, teacher.blocks[block].mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()


# ---------------------------------------------------------------------------------------------
# The searches


@pytest.mark.parametrize("method", KEEP_SEARCHES)
@pytest.mark.parametrize("depth, reduction", [(6, 2), (6, 3), (6, 4), (7, 2), (7, 3)])
def test_a_search_keeps_ceil_depth_over_r_increasing_blocks_deterministically(method, depth, reduction):
    teacher = _teacher(depth)
    choice = choose_blocks(teacher, reduction, method, _images(), seed=3)
    kept = list(choice.kept)
    assert len(kept) == math.ceil(depth / reduction)
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < depth
    again = choose_blocks(teacher, reduction, method, _images(), seed=3)
    assert again == choice
    assert all(len(c["kept"]) == len(kept) for c in choice.candidates.values())  # rivals of the same size only


@pytest.mark.parametrize("reduction", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_auto_is_never_worse_than_first_on_its_scoring_images(reduction, seed):
    teacher = _teacher(seed=seed + 5)
    images = _images(30, seed)
    choice = choose_blocks(teacher, reduction, "auto", images, seed=seed)
    assert set(choice.candidates) == {"first", "last", "greedy", "influence"}
    assert choice.chosen in choice.candidates and list(choice.kept) == choice.candidates[choice.chosen]["kept"]
    assert choice.candidates[choice.chosen]["l1"] == min(c["l1"] for c in choice.candidates.values())
    # Measured again through the students themselves: copy vs teacher, last block before the final norm.
    _, scoring = split_images(len(images), seed)
    held_out = images[scoring]
    assert choice.score_images == len(scoring) and choice.search_images == len(images) - len(scoring)
    (target,) = last_block_tokens(teacher, held_out)

    def l1(keep):
        student = build_student(teacher, reduction, keep, mode="weco-kd")
        with torch.no_grad():
            (tokens,) = last_block_tokens(student, held_out)
        return (tokens - target).abs().mean().item()

    auto_l1, first_l1 = l1(list(choice.kept)), l1("first")
    assert auto_l1 == pytest.approx(choice.candidates[choice.chosen]["l1"], rel=1e-4)
    assert first_l1 == pytest.approx(choice.candidates["first"]["l1"], rel=1e-4)
    assert auto_l1 <= first_l1 * (1 + 1e-5)


@pytest.mark.parametrize("method", ["greedy", "influence", "auto"])
@pytest.mark.parametrize("identity", [0, 2, 5])
def test_a_block_made_an_identity_is_dropped(method, identity):
    teacher = _teacher()
    _make_identity(teacher, identity)
    images = _images()
    with torch.no_grad():  # the block really passes its input through
        x = embed(teacher, images)
        torch.testing.assert_close(teacher.blocks[identity](x), x)
    choice = choose_blocks(teacher, 2, method, images)
    searched = ["greedy", "influence"] if method == "auto" else [method]
    for name in searched:
        assert identity not in choice.candidates[name]["kept"], (name, choice)


def _naive_greedy(teacher, count, tokens):
    """Greedy removal recomputing every candidate copy from the embedded tokens (no reuse of block inputs)."""
    kept = list(range(len(teacher.blocks)))
    while len(kept) > count:
        scores = [(initial_l1(teacher, kept[:i] + kept[i + 1:], tokens), i) for i in range(len(kept))]
        kept.pop(min(scores)[1])
    return kept


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_reusing_block_inputs_equals_recomputing_every_copy(seed):
    teacher = _teacher(seed=seed)
    tokens = teacher_tokens(teacher, _images(16, seed), batch_size=5)  # several chunks
    for count in (2, 4):
        assert greedy_removal(teacher, count, tokens) == _naive_greedy(teacher, count, tokens)


def test_block_influence_is_one_minus_cosine_of_input_and_output():
    teacher = _teacher()
    tokens = teacher_tokens(teacher, _images(8), batch_size=3)
    influence = block_influence(teacher, tokens)
    x = torch.cat(tokens.embedded)
    with torch.no_grad():
        for b, block in enumerate(teacher.blocks):
            y = block(x)
            assert influence[b] == pytest.approx((1 - torch.cosine_similarity(x, y, dim=-1)).mean().item(), rel=1e-5)
            x = y
    assert most_influential([0.5, 0.1, 0.9, 0.3], 2) == [0, 2]
    assert most_influential([0.2, 0.2, 0.2], 2) == [0, 1]


def test_the_split_is_seeded_and_disjoint():
    search, score = split_images(30, 4)
    assert (search, score) == split_images(30, 4) != split_images(30, 5)
    assert sorted(search + score) == list(range(30)) and len(score) == 10
    with pytest.raises(UserError, match="at least 2 images"):
        split_images(1, 0)


def test_searches_need_images_and_a_known_method(teacher):
    with pytest.raises(UserError, match="pass images="):
        build_student(teacher, 2, "auto")
    with pytest.raises(UserError, match="auto, greedy, influence"):
        choose_blocks(teacher, 2, "best", _images())
    with pytest.raises(UserError, match="reduction 6"):
        choose_blocks(teacher, 6, "auto", _images())


def test_the_api_builds_an_auto_student_and_a_list_reproduces_it():
    teacher = _teacher()
    plan = plan_student(teacher, 2, "auto", images=_images(), seed=0)
    assert plan.keep == "auto" and plan.search["chosen"] in plan.search["candidates"]
    student = wecolora.build_student(teacher, 2, "auto", mode="wecolora", images=_images(), seed=0)
    again = plan_student(teacher, 2, ",".join(map(str, plan.kept)))
    assert len(student.blocks) == len(plan.kept) and again.kept == plan.kept
    assert again.segment_ends == plan.segment_ends  # same segments, so per-block matching is reproduced too


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("greedy", "greedy"), ("0,3,7,11", [0, 3, 7, 11]),
                                            (" 1, 2", [1, 2]), (4, [4]), ([0, 2], [0, 2])])
def test_parse_keep(text, expected):
    assert parse_keep(text) == expected


@pytest.mark.parametrize("text", ["best", "0,x", "", []])
def test_parse_keep_refuses(text):
    with pytest.raises(UserError, match="expected one of first, last, auto, greedy, influence"):
        parse_keep(text)


# ---------------------------------------------------------------------------------------------
# One place for the plan


FORBIDDEN = [  # what only the method's plan (method/plan.py, method/blocks.py) may compute: a default rank, a kept list, segment ends
    r"default_rank\(", r"select_blocks\(", r"segment_ends\(", r"group_ends", r"wecolora_kept_blocks",
    r"min\(128", r"range\(0, depth", r"keep_blocks\(", r"range\(reduction - 1",
]


PLAN_MODULES = ("method/plan.py", "method/blocks.py", "api.py")  # api.py re-exports select_blocks


@pytest.mark.parametrize("path", sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py"
                                        and p.relative_to(SRC).as_posix() not in PLAN_MODULES),
                         ids=lambda p: p.relative_to(SRC).as_posix())
def test_only_the_plan_resolves_kept_blocks_and_rank(path):
    text = path.read_text()
    text = re.sub(r"plan\.segment_ends|\.select_blocks\b|import .*select_blocks.*", "", text)
    if path.name == "block_search.py":  # the searches' fixed rivals come from blocks.select_blocks
        text = text.replace("select_blocks(depth, reduction", "")
    found = [pattern for pattern in FORBIDDEN if re.search(pattern, text)]
    assert not found, f"{path.name} resolves the student itself ({found}); read method.plan.plan_student's plan"


def test_consumers_read_the_plan(teacher):
    from wecolora.bench.run import make_trainer

    plan = plan_student(teacher, 3, "first", "wecolora")
    trainer = make_trainer(teacher, mode="wecolora", reduction=3, rank=plan.rank, precision="fp32",
                           device=torch.device("cpu"), updates_per_epoch=1)
    assert trainer.training.teacher_blocks == [plan.segment_ends[-1]] == [5]
    info = describe(teacher, 3, "0,4", "wecolora")
    assert (info["kept_blocks"], info["segment_ends"], info["rank"]) == ([0, 4], [3, 5], default_rank(32))


# ---------------------------------------------------------------------------------------------
# distill: recorded, reproducible, resumable


def _config(teacher_dir, output, **overrides):
    settings = dict(teacher=f"local-dir:{teacher_dir}", data="mnist-5k", output=str(output), ratio=0.02,
                    epochs=1, warmup_epochs=0, batch_size=16, accum_steps=1, blr=5e-3, num_workers=0, device="cpu",
                    rank=4, keep_images=48)
    settings.update(overrides)
    return DistillConfig(**settings)


def _resolved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())["resolved"]


def test_distill_records_an_auto_choice_and_a_list_reproduces_it(teacher_dir, tmp_path):
    result = distill(_config(teacher_dir, tmp_path / "auto", keep="auto"))
    resolved = _resolved(tmp_path / "auto")
    info = json.loads((tmp_path / "auto" / "adapter" / "wecolora.json").read_text())
    search = resolved["block_search"]
    assert resolved["keep_method"] == info["keep_method"] == "auto"
    assert resolved["kept_blocks"] == info["kept_blocks"] == search["kept_blocks"] == result["kept_blocks"]
    assert info["block_search"] == search and info["segment_ends"] == resolved["segment_ends"]
    assert set(search["candidates"]) == {"first", "last", "greedy", "influence"}
    assert search["search_images"] + search["score_images"] == 48
    assert search["candidates"][search["chosen"]]["l1"] <= search["candidates"]["first"]["l1"]
    assert len(resolved["kept_blocks"]) == 3 and resolved["rank"] == info["rank"] == 4

    listed = ",".join(map(str, resolved["kept_blocks"]))
    distill(_config(teacher_dir, tmp_path / "list", keep=listed))
    again = _resolved(tmp_path / "list")
    assert again["kept_blocks"] == resolved["kept_blocks"] and again["segment_ends"] == resolved["segment_ends"]
    assert again["keep_method"] == "list" and again["block_search"] is None


def test_per_block_matching_follows_the_segments_of_any_list(teacher_dir, tmp_path):
    distill(_config(teacher_dir, tmp_path / "run", keep="0,1,4", match="per-block"))
    resolved = _resolved(tmp_path / "run")
    assert resolved["segment_ends"] == resolved["matched_teacher_blocks"] == [0, 3, 5]
    assert resolved["matched_student_blocks"] == [0, 1, 2]


def test_a_resumed_search_run_reuses_its_recorded_choice(teacher_dir, tmp_path, monkeypatch):
    import wecolora.train.distill as distill_module

    with interrupted_after_first_checkpoint(monkeypatch, distill_module):
        distill(_config(teacher_dir, tmp_path / "run", keep="influence", epochs=2, warmup_epochs=1))
    chosen = _resolved(tmp_path / "run")["kept_blocks"]

    def no_search(*args, **kwargs):
        raise AssertionError("a resumed run must not search again")

    monkeypatch.setattr(distill_module, "choose_blocks", no_search)
    result = distill(_config(teacher_dir, tmp_path / "run", keep="influence", epochs=2, warmup_epochs=1, resume="auto"))
    assert [row["epoch"] for row in result["epochs"]] == [1, 2]
    assert result["kept_blocks"] == chosen and result["block_search"]["method"] == "influence"


def test_inspect_refuses_a_searched_keep_and_names_the_way(teacher_dir, capsys):
    from wecolora.cli import main

    assert main(["inspect", "--teacher", f"local-dir:{teacher_dir}", "--keep", "greedy"]) == 2
    assert "run distill --keep greedy" in capsys.readouterr().err
    assert main(["inspect", "--teacher", f"local-dir:{teacher_dir}", "--keep", "0,1,4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kept_blocks"], info["segment_ends"]) == ([0, 1, 4], [0, 3, 5])
