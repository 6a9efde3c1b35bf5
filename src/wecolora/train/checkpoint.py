"""Resumable training state, in formats that load without unpickling code.

Trainable weights go to safetensors, the optimizer state through ``torch.save`` (read back with
``weights_only=True``), the scheduler and progress counters to JSON. Nothing depends on the world
size, so a run can resume on a different number of processes.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from wecolora.errors import UserError
from wecolora.files import atomic_dir
from wecolora.runtime import make_scheduler
from wecolora.train.run_folder import CHECKPOINT_FILES

_logger = logging.getLogger(__name__)

WEIGHTS, OPTIMIZER, STATE = CHECKPOINT_FILES  # named in run_folder.py, which checks them without torch


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, progress: dict) -> None:
    """Atomically write the state needed to continue training after ``progress['epoch']`` epochs."""
    optimizer_bytes = io.BytesIO()
    torch.save(optimizer.state_dict(), optimizer_bytes)
    # Serialised in memory and written by Python, so a full disk raises OSError (ENOSPC) rather than
    # the opaque errors torch.save and safetensors report for failed writes.
    with atomic_dir(path) as tmp:
        (tmp / WEIGHTS).write_bytes(save(trainable_state(model)))
        (tmp / OPTIMIZER).write_bytes(optimizer_bytes.getvalue())
        (tmp / STATE).write_text(json.dumps({"progress": progress, "scheduler": scheduler.state_dict()}, indent=1))


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore a :func:`save_checkpoint` folder into live objects; returns its ``progress``."""
    path = Path(path)
    if not all((path / name).is_file() for name in (WEIGHTS, OPTIMIZER, STATE)):
        raise UserError(f"{path} is not a complete wecolora checkpoint (needs {WEIGHTS}, {OPTIMIZER}, {STATE})")
    try:
        weights = load_file(str(path / WEIGHTS))
        optim_state = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
        state = json.loads((path / STATE).read_text())
    except Exception as err:  # safetensors/torch/json each raise their own type for damaged files
        raise UserError(f"checkpoint {path} is damaged: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if not (isinstance(state, dict) and isinstance(state.get("scheduler"), dict)
            and isinstance(state.get("progress"), dict) and "epoch" in state["progress"]):
        # Checked before anything is copied into the live objects.
        raise UserError(f"checkpoint {path} is damaged: {STATE} lacks the scheduler state or the progress counters")
    expected = dict(model.named_parameters())
    mismatched = sorted(k for k in weights if k not in expected or expected[k].shape != weights[k].shape)
    missing = sorted(k for k, p in expected.items() if p.requires_grad and k not in weights)
    if mismatched or missing:
        raise UserError(f"checkpoint {path} does not fit this run: unexpected {mismatched[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            expected[name].copy_(tensor)
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(state["scheduler"])
    return state["progress"]


def resume_schedule(optimizer, scheduler, progress: dict, *, epochs: int, warmup_epochs: int,
                    updates_per_epoch: int, lr: float):
    """``(scheduler, updates)`` to continue a checkpointed run after ``progress['epoch']`` epochs.

    With the checkpoint's updates per epoch and peak lr, its restored schedule continues as it was. With
    another effective batch (world size, batch or accumulation), the schedule restarts at the same epoch
    with this run's updates per epoch and lr; the weights and optimizer moments carry over.
    """
    saved = progress.get("updates_per_epoch", updates_per_epoch), progress.get("lr", lr)
    if saved == (updates_per_epoch, lr):
        return scheduler, progress["updates"]
    _logger.warning("resuming with %d updates per epoch and lr %.3g (the checkpoint had %s and %.3g)",
                    updates_per_epoch, lr, saved[0], saved[1])
    for group in optimizer.param_groups:
        group["initial_lr"] = lr  # what the new schedule scales (the checkpoint's optimizer holds the old one)
    updates = progress["epoch"] * updates_per_epoch
    scheduler = make_scheduler(optimizer, epochs, warmup_epochs, updates_per_epoch)
    scheduler.step_update(updates)
    return scheduler, updates
