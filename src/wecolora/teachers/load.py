"""Loading a teacher from a spec: timm names, ``local-dir:``/``hf-hub:`` folders, run folders, the bundled
teachers and transformers folders, with optional local weights read without unpickling code; errors a user
can fix are explained in one line."""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from wecolora.errors import UserError
from wecolora.teachers.hf_transformers import load, transformers_folder
from wecolora.teachers.specs import BUNDLED_TEACHERS, bundled_teacher
from wecolora.teachers.vit import require_supported_vit


def _resolve_spec(spec: str) -> str:
    """Turn ``bundled``, ``bundled-mae``, run folders and plain folders into timm's ``local-dir:`` form."""
    if spec in BUNDLED_TEACHERS:
        return f"local-dir:{bundled_teacher(spec)}"
    path = Path(spec)
    if spec.startswith(("local-dir:", "hf-hub:")) or not path.exists():
        return spec
    for candidate in (path / "student", path / "model", path):
        if (candidate / "config.json").is_file():
            return f"local-dir:{candidate}"
    raise UserError(f"{spec} is a folder without config.json: give a timm model folder, a run folder or a model name")


def _checked_spec(spec: str) -> tuple[str, str]:
    """``(spec in timm's form, source)``: source ``local-dir``, ``hf-hub`` or ``""`` for a timm name; missing
    folders and unknown names are refused."""
    import timm

    spec = _resolve_spec(spec)
    source, _, name = spec.partition(":") if spec.startswith(("local-dir:", "hf-hub:")) else ("", "", spec)
    if source == "local-dir" and not Path(name).is_dir():
        raise UserError(f"model folder {name} does not exist")
    if not source and not timm.is_model(name.split(".")[0]):
        raise UserError(f"unknown model {spec!r}: not a timm model name, a folder, local-dir:FOLDER or hf-hub:ORG/NAME")
    return spec, source


def _size_args(img_size: int | None, num_classes: int | None) -> dict:
    return {k: v for k, v in (("img_size", img_size), ("num_classes", num_classes)) if v is not None}


def load_model(spec: str, *, weights: str | None = None, img_size: int | None = None, num_classes: int | None = None,
               pretrained: bool = True) -> nn.Module:
    """Create a timm ViT from a spec, with pretrained weights from the spec or from a local file.

    Args:
        spec: timm name (``vit_small_patch16_224.dino``), ``local-dir:FOLDER``, ``hf-hub:ORG/NAME``, ``bundled``,
            ``bundled-mae`` (the self-supervised Fashion-MNIST teacher), a folder holding ``config.json`` (a run
            folder resolves to its ``student/``), or a Hugging Face transformers ViT/DeiT/ViT-MAE/DINOv2 folder
            (also ``hf-transformers:FOLDER``), converted by :mod:`wecolora.teachers.hf_transformers`.
        weights: optional local ``.safetensors``/``.pth`` loaded into that architecture through timm's
            pretrained path (handles MAE/DINOv2/CLIP layouts, pos-embed resize and head drop).
        img_size: optional input size override (pos-embed is resized by timm).
        num_classes: optional head size override (0 drops the head).
        pretrained: False builds the architecture only (random weights; no download, no file read).

    Returns:
        The model in eval mode on the CPU.
    """
    import timm


    folder = transformers_folder(spec)
    if folder is not None:
        if weights is not None:
            raise UserError(f"--teacher-weights cannot be combined with the transformers folder {folder}: its "
                            f"model.safetensors is the weights; drop --teacher-weights or save the model again")
        model = load(folder, img_size=img_size, num_classes=num_classes, pretrained=pretrained)
        require_supported_vit(model)
        return model
    spec, source = _checked_spec(spec)
    kwargs = _size_args(img_size, num_classes)
    if pretrained and source != "hf-hub":
        # The architecture is checked on a weightless copy first: a ResNet or an EVA is refused before
        # any download or multi-GB read.
        model_shape(spec, img_size=img_size, num_classes=num_classes)
    if weights is not None and pretrained:
        # Read here, never by unpickling code; timm then applies its key/shape adaptation (filter_fn).
        kwargs["pretrained_cfg_overlay"] = dict(source="", state_dict=read_weights(weights), file=None)
    try:
        model = timm.create_model(spec, pretrained=pretrained, **kwargs)
    except Exception as err:  # timm/hub raise many types; classify the ones a user can fix
        raise UserError(_explain_load_error(spec, weights, err)) from err
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg.pop("state_dict", None)  # tensors have no place in the saved config.json
        if weights is not None:
            model.pretrained_cfg["file"] = str(Path(weights).resolve())
    require_supported_vit(model)
    return model.eval()


def model_shape(spec: str, *, img_size: int | None = None, num_classes: int | None = None) -> nn.Module:
    """The architecture of a spec on the ``meta`` device: no weights read, no memory, checked layout.

    Used to validate reductions, ranks and image sizes before a teacher's weights are loaded.
    """
    import timm


    folder = transformers_folder(spec)
    if folder is not None:
        with torch.device("meta"):
            model = load(folder, img_size=img_size, num_classes=num_classes, pretrained=False)
        require_supported_vit(model)
        return model
    spec, _ = _checked_spec(spec)
    try:
        with torch.device("meta"):
            model = timm.create_model(spec, pretrained=False, **_size_args(img_size, num_classes))
    except Exception as err:
        raise UserError(_explain_load_error(spec, None, err)) from err
    require_supported_vit(model)
    return model


WEIGHTS_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # nestings timm's trainers write


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or a ``.pth`` read with ``torch.load(weights_only=True)``.

    A pickle that would import or call code is refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--teacher-weights {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise UserError(f"--teacher-weights {path} is not a valid safetensors file: {_first_line(err)}") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing them
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"refusing to load --teacher-weights {path}: {_unsafe_pickle(err)}; only plain tensors "
                        f"are read (torch.load weights_only=True). If you trust the file, convert its state dict "
                        f"to .safetensors") from None
    except Exception as err:  # zip/EOF/format errors from torch.load
        raise UserError(f"--teacher-weights {path} is not a readable .pth file: {_first_line(err)}") from None
    if isinstance(checkpoint, dict):
        checkpoint = next((checkpoint[k] for k in WEIGHTS_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise UserError(f"--teacher-weights {path} holds no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _unsafe_pickle(err: BaseException) -> str:
    """What torch's weights-only unpickler objected to, in a few words."""
    names = re.findall(r"GLOBAL ([\w.]+)", str(err))
    if names:
        return f"it is a pickle that would import {', '.join(dict.fromkeys(names))} (code that runs on load)"
    detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
    reason = detail.group(1).strip() if detail else _first_line(err)
    return f"it is not a tensors-only checkpoint ({reason}): a pickle of code or objects, or not a checkpoint at all"


def _explain_load_error(spec: str, weights: str | None, err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    mismatch = _state_dict_mismatch(str(err))
    if mismatch:
        return f"cannot load {weights or spec} into {spec}: {mismatch}"
    if "weights only load failed" in str(err).lower() or "blocked loading" in str(err):
        return (f"refusing to load the weights of {spec!r}: the file is a pickle that would import or run code; "
                f"only tensors are read (weights_only=True). If you trust it, convert it to .safetensors")
    if "LocalEntryNotFound" in text or "offline" in text.lower() or "connect" in text.lower() or "url" in text.lower():
        return (f"cannot fetch pretrained weights for {spec!r} (offline?): pass --teacher-weights FILE, "
                f"a local-dir:FOLDER, or run once with network access to fill the Hugging Face cache")
    if weights:
        return f"cannot load {weights} into {spec}: {text}"
    return f"cannot load model {spec!r}: {text}"


def _state_dict_mismatch(text: str, limit: int = 3) -> str:
    """torch's multi-line load_state_dict error as one line naming the first keys of each kind."""
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        match = re.search(pattern, text)
        if match:
            keys = re.findall(r'"([^"]+)"', match.group(1))
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{label} keys {', '.join(keys[:limit])}{more}")
    sizes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[[^\]]*\])\) "
                       r"from checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", text)
    if sizes:
        more = f" (+{len(sizes) - limit} more)" if len(sizes) > limit else ""
        parts.append("shape mismatch " + ", ".join(f"{k} file {a} vs model {b}" for k, a, b in sizes[:limit]) + more)
    return "; ".join(parts)
