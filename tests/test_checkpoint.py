"""Tests for wecolora.train.checkpoint: save/load round trip of the trainable weights, optimizer and
timm scheduler, refusal of damaged or foreign checkpoints, and how a resumed schedule continues."""
import json
import math

import pytest
import torch

from wecolora.errors import UserError
from wecolora.runtime import make_scheduler
from wecolora.train.checkpoint import (
    OPTIMIZER,
    STATE,
    WEIGHTS,
    load_checkpoint,
    resume_schedule,
    save_checkpoint,
    trainable_state,
)

from conftest import tiny_vit

EPOCHS, WARMUP, PER_EPOCH, LR = 4, 1, 3, 1e-2


def _run(seed: int = 0):
    """A tiny ViT whose first block and patch embedding are frozen, with AdamW and the runs' scheduler.

    The frozen weights are the same for every seed (they are the teacher's copy); ``seed`` moves the others.
    """
    model = tiny_vit(depth=2)
    for p in [*model.blocks[0].parameters(), *model.patch_embed.parameters()]:
        p.requires_grad_(False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        torch.manual_seed(seed + 1)
        for p in model.parameters():
            if p.requires_grad and seed:
                p.add_(0.1 * torch.randn_like(p))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    scheduler = make_scheduler(optimizer, EPOCHS, WARMUP, PER_EPOCH)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int, start: int = 0):
    for step in range(start, start + steps):
        images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        loss = model(images).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)


def test_trainable_state_holds_only_trainable_parameters():
    model, _, _ = _run()
    state = trainable_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable and trainable
    assert not any(name.startswith(("blocks.0.", "patch_embed.")) for name in state)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())


def test_round_trip_restores_weights_optimizer_and_schedule(tmp_path):
    model, optimizer, scheduler = _run()
    _train(model, optimizer, scheduler, steps=4)
    progress = {"epoch": 1, "updates": 4, "updates_per_epoch": PER_EPOCH, "lr": LR}
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, progress)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([WEIGHTS, OPTIMIZER, STATE])

    fresh, fresh_optimizer, fresh_scheduler = _run(seed=1)  # other weights, an empty optimizer state
    assert not torch.equal(fresh.head.weight, model.head.weight)
    assert load_checkpoint(tmp_path / "ckpt", fresh, fresh_optimizer, fresh_scheduler) == progress
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    for key, state in saved["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded["state"][key][name], state[name]), (key, name)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()

    # both continue identically
    _train(model, optimizer, scheduler, steps=2, start=4)
    _train(fresh, fresh_optimizer, fresh_scheduler, steps=2, start=4)
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_the_state_file_is_json_and_the_optimizer_loads_without_code(tmp_path):
    model, optimizer, scheduler = _run()
    _train(model, optimizer, scheduler, steps=1)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"epoch": 0, "updates": 1})
    state = json.loads((tmp_path / "ckpt" / STATE).read_text())
    assert state["progress"] == {"epoch": 0, "updates": 1} and "scheduler" in state
    torch.load(tmp_path / "ckpt" / OPTIMIZER, weights_only=True)


def test_saving_again_replaces_the_folder(tmp_path):
    model, optimizer, scheduler = _run()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"epoch": 0})
    (tmp_path / "ckpt" / "stray.txt").write_text("x")
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"epoch": 1})
    assert not (tmp_path / "ckpt" / "stray.txt").exists()
    assert load_checkpoint(tmp_path / "ckpt", *_run()) == {"epoch": 1}


DAMAGES = {
    "weights truncated": (WEIGHTS, lambda data: data[: len(data) // 2]),
    "weights garbage": (WEIGHTS, lambda data: b"not safetensors at all"),
    "optimizer truncated": (OPTIMIZER, lambda data: data[:20]),
    "state not json": (STATE, lambda data: b"{\"progress\": "),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_file_is_a_user_error(tmp_path, damage):
    model, optimizer, scheduler = _run()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"epoch": 0})
    name, change = DAMAGES[damage]
    file = tmp_path / "ckpt" / name
    file.write_bytes(change(file.read_bytes()))
    with pytest.raises(UserError, match="is damaged"):
        load_checkpoint(tmp_path / "ckpt", *_run())


@pytest.mark.parametrize("text", ["{}", "[1]", '{"progress": {"epoch": 0}}'])
def test_a_state_file_without_its_keys_is_a_user_error(tmp_path, text):
    model, optimizer, scheduler = _run()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"epoch": 0})
    (tmp_path / "ckpt" / STATE).write_text(text)
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(tmp_path / "ckpt", *_run())


@pytest.mark.parametrize("missing", [WEIGHTS, OPTIMIZER, STATE])
def test_an_incomplete_folder_is_a_user_error(tmp_path, missing):
    model, optimizer, scheduler = _run()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"epoch": 0})
    (tmp_path / "ckpt" / missing).unlink()
    with pytest.raises(UserError, match="not a complete wecolora checkpoint"):
        load_checkpoint(tmp_path / "ckpt", *_run())


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    model, optimizer, scheduler = _run()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"epoch": 0})
    other = tiny_vit(depth=2, embed_dim=16)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=LR)
    with pytest.raises(UserError, match="does not fit this run"):
        load_checkpoint(tmp_path / "ckpt", other, other_optimizer, make_scheduler(other_optimizer, EPOCHS, WARMUP,
                                                                                  PER_EPOCH))


def test_a_checkpoint_missing_trainable_weights_is_refused(tmp_path):
    model, optimizer, scheduler = _run()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"epoch": 0})
    more, _, _ = _run()
    more.blocks[0].attn.qkv.weight.requires_grad_(True)  # trainable here, frozen in the checkpoint
    more_optimizer = torch.optim.AdamW([p for p in more.parameters() if p.requires_grad], lr=LR)
    with pytest.raises(UserError, match="missing"):
        load_checkpoint(tmp_path / "ckpt", more, more_optimizer, make_scheduler(more_optimizer, EPOCHS, WARMUP,
                                                                                PER_EPOCH))


def test_resume_schedule_with_the_same_batch_continues_the_saved_schedule():
    _, optimizer, scheduler = _run()
    progress = {"epoch": 1, "updates": 3, "updates_per_epoch": PER_EPOCH, "lr": LR}
    same, updates = resume_schedule(optimizer, scheduler, progress, epochs=EPOCHS, warmup_epochs=WARMUP,
                                    updates_per_epoch=PER_EPOCH, lr=LR)
    assert same is scheduler and updates == 3


def test_resume_schedule_with_another_batch_restarts_at_the_same_epoch():
    _, optimizer, scheduler = _run()
    progress = {"epoch": 2, "updates": 6, "updates_per_epoch": PER_EPOCH, "lr": LR}
    new_lr, per_epoch = 2 * LR, 5
    new, updates = resume_schedule(optimizer, scheduler, progress, epochs=EPOCHS, warmup_epochs=WARMUP,
                                   updates_per_epoch=per_epoch, lr=new_lr)
    assert new is not scheduler and updates == 2 * per_epoch
    # epoch 2 of 4 with 1 warmup epoch: one third into the cosine of the new peak lr
    expected = 0.5 * new_lr * (1 + math.cos(math.pi * (updates - per_epoch) / ((EPOCHS - WARMUP) * per_epoch)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_loading_leaves_frozen_weights_alone(tmp_path):
    model, optimizer, scheduler = _run()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"epoch": 0})
    fresh, fresh_optimizer, fresh_scheduler = _run()
    with torch.no_grad():
        fresh.blocks[0].attn.qkv.weight.fill_(3.0)  # frozen: the checkpoint has nothing to say about it
    load_checkpoint(tmp_path / "ckpt", fresh, fresh_optimizer, fresh_scheduler)
    assert bool((fresh.blocks[0].attn.qkv.weight == 3.0).all())
