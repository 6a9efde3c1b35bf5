"""Run outputs: the merged ``student/`` timm folder and the ``adapter/`` folder with ``wecolora.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from wecolora.errors import UserError
from wecolora.files import atomic_dir
from wecolora.method.adapters import has_adapters, merge
from wecolora.teachers.load import load_model
from wecolora.teachers.vit import model_args

RUN_INFO = "wecolora.json"


def save_student(model: nn.Module, folder: str | Path) -> None:
    """Save a plain timm ViT as a folder that ``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads."""
    from timm.models import save_for_hf

    model = model.cpu()
    with atomic_dir(folder) as tmp:
        save_for_hf(model, tmp, safe_serialization=True, model_args=model_args(model))


def export_run(student: nn.Module, output: str | Path, plan, info: dict) -> nn.Module:
    """Write ``student/`` (adapters merged) and ``adapter/`` (peft files + ``wecolora.json``).

    ``wecolora.json`` holds ``info`` (teacher, objective) and the student's plan
    (:meth:`wecolora.method.plan.StudentPlan.record`: kept blocks, how they were chosen, segment ends, rank).
    Returns the merged plain timm model.
    """
    output = Path(output)
    merged = merge(student).eval()
    save_student(merged, output / "student")
    with atomic_dir(output / "adapter") as tmp:
        if has_adapters(student):
            student.save_pretrained(str(tmp))
        (tmp / RUN_INFO).write_text(json.dumps({**info, **plan.record()}, indent=1))
    return merged


def read_run_info(run: str | Path) -> dict:
    return json.loads((Path(run) / "adapter" / RUN_INFO).read_text())


ONNX_EXTRA = "pip install 'wecolora[onnx]'  (onnx, onnxscript, onnxruntime)"


def export_onnx(model_spec: str | Path, path: str | Path | None = None, *, opset: int = 18, atol: float = 1e-4,
                check_batches: tuple[int, ...] = (1, 3)) -> dict:
    """Export a merged student (a run folder, its ``student/`` or any model spec) to ONNX, checked with onnxruntime.

    The graph takes ``images`` ``[batch, C, H, W]`` (batch is dynamic) and returns what the timm model's
    forward returns. It is written under a temporary name, run by onnxruntime at several batch sizes against
    torch, and moved into place only when every output is within ``atol``.

    Args:
        model_spec: a run folder (its merged ``student/`` is exported), a timm folder or a model spec.
        path: the ``.onnx`` file (default ``RUN/student.onnx``, or ``model.onnx`` in the current folder).
        opset: ONNX opset version.

    Returns:
        ``{"path", "opset", "max_abs_diff", "batches", "input_size"}``.

    Example:
        >>> export_onnx("runs/fm-r2")["max_abs_diff"] < 1e-4   # doctest: +SKIP
    """
    import tempfile

    import torch

    from wecolora.data.transforms import data_config

    try:
        import onnxruntime
    except ImportError as err:
        raise UserError(f"ONNX export needs the onnx extra ({err.name} is missing): {ONNX_EXTRA}") from None
    spec = str(model_spec)
    folder = Path(spec)
    if path is None:
        path = folder / "student.onnx" if folder.is_dir() else Path("model.onnx")
    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"--output {path} must end with .onnx")
    model = load_model(spec).eval()
    input_size = tuple(data_config(model)["input_size"])
    generator = torch.Generator().manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_path = Path(tmp) / path.name
        _export_graph(model, torch.randn(2, *input_size, generator=generator), tmp_path, opset)
        worst = _onnx_vs_torch(onnxruntime, model, tmp_path, input_size, check_batches, generator)
        if not worst <= atol:
            raise UserError(f"onnxruntime differs from torch by {worst:.3g} (> {atol:g}); the ONNX file was not written")
        data = tmp_path.with_name(path.name + ".data")
        if data.exists():  # weights stored beside the graph: move them first, the graph (what readers open) last
            os.replace(data, path.with_name(path.name + ".data"))
        os.replace(tmp_path, path)
    return {"path": str(path), "opset": opset, "max_abs_diff": worst, "batches": list(check_batches),
            "input_size": list(input_size)}


def _export_graph(model: nn.Module, example, path: Path, opset: int) -> None:
    """``torch.onnx.export`` with a dynamic batch; weights beside the graph past protobuf's 2 GB limit."""
    import contextlib
    import io

    import torch

    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(model, (example,), str(path), opset_version=opset, dynamo=True,
                          input_names=["images"], output_names=["output"], external_data=big,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})


def _onnx_vs_torch(onnxruntime, model: nn.Module, path: Path, input_size: tuple, batches: tuple[int, ...], generator) -> float:
    """The largest |onnxruntime - torch| over random inputs at each batch size; a shape mismatch is refused."""
    import numpy as np
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in batches:
        images = torch.randn(batch, *input_size, generator=generator)
        with torch.inference_mode():
            expected = model(images).numpy()
        got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
        if got.shape != expected.shape:
            raise UserError(f"the ONNX graph returns shape {got.shape} for batch {batch}, torch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
