"""Run outputs: the merged ``student/`` timm folder and the ``adapter/`` folder with ``wecolora.json``."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from . import adapters, vit
from .files import atomic_dir

RUN_INFO = "wecolora.json"


def save_student(model: nn.Module, folder: str | Path) -> None:
    """Save a plain timm ViT as a folder that ``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads."""
    from timm.models import save_for_hf

    model = model.cpu()
    with atomic_dir(folder) as tmp:
        save_for_hf(model, tmp, safe_serialization=True, model_args=vit.model_args(model))


def export_run(student: nn.Module, output: str | Path, info: dict) -> nn.Module:
    """Write ``student/`` (adapters merged) and ``adapter/`` (peft files + ``wecolora.json``).

    Returns the merged plain timm model.
    """
    output = Path(output)
    merged = adapters.merge(student).eval()
    save_student(merged, output / "student")
    with atomic_dir(output / "adapter") as tmp:
        if adapters.has_adapters(student):
            student.save_pretrained(str(tmp))
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=1))
    return merged


def read_run_info(run: str | Path) -> dict:
    return json.loads((Path(run) / "adapter" / RUN_INFO).read_text())
