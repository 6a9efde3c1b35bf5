"""Teacher specs as the user types them (``bundled``, ``bundled-mae``, timm names, folders, ``local-dir:``,
``hf-hub:``, transformers folders) checked with the standard library alone, and the bundled teachers' folders."""
from __future__ import annotations

from pathlib import Path

from wecolora.errors import UserError
from wecolora.teachers.hf_transformers import check_folder, transformers_folder

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


# The teachers shipped with the package (timm folders; see each folder's RECIPE.md): the supervised
# Fashion-MNIST ViT and the self-supervised (MAE) one.
BUNDLED_TEACHERS = {"bundled": Path(__file__).parent / "assets" / "teacher",
                    "bundled-mae": Path(__file__).parent / "assets" / "teacher-mae"}


BUNDLED_HOW = {"bundled": "wecolora pretrain --data fashion-mnist",
               "bundled-mae": "wecolora pretrain --objective mae --data fashion-mnist"}


def bundled_teacher(spec: str) -> Path:
    """The folder of a bundled teacher (``bundled``, ``bundled-mae``), refused in one line when not installed."""
    folder = BUNDLED_TEACHERS[spec]
    if not (folder / "config.json").is_file():
        raise UserError(f"the {spec} teacher is not in this install ({folder} has no config.json); train one with "
                        f"`{BUNDLED_HOW[spec]} --output DIR` and pass DIR, or use another teacher")
    return folder


def check_model_spec(spec: str, option: str = "--teacher") -> None:
    """Folders named by a model spec exist and hold a ``config.json``; names are left to timm.

    A transformers folder (``config.json`` with a ``model_type``) must be one that converts to a timm ViT.
    """
    if not spec:
        raise UserError(f"{option} is empty; give a timm model name, a folder, local-dir:FOLDER, hf-hub:ORG/NAME, "
                        f"hf-transformers:FOLDER, bundled or bundled-mae")
    if spec in BUNDLED_TEACHERS:
        bundled_teacher(spec)
        return
    if spec.startswith("hf-hub:"):
        return
    folder = transformers_folder(spec)
    if folder is not None:
        check_folder(folder, option)
        return
    if spec.startswith("local-dir:"):
        folder = Path(spec.partition(":")[2]).expanduser()
        if not folder.is_dir():
            raise UserError(f"{option} {spec}: model folder {folder} does not exist")
        if not (folder / "config.json").is_file():
            raise UserError(f"{option} {spec}: {folder} has no config.json; give a timm model folder "
                            f"(saved with timm's save_for_hf)")
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{option} {spec} is a file; pass weights with --teacher-weights and an architecture "
                            f"name with {option}")
        if not any((path / sub / "config.json").is_file() for sub in ("student", "model", ".")):
            raise UserError(f"{option} {spec} is a folder without config.json: give a timm model folder, a run "
                            f"folder or a model name")
    elif "/" in spec or spec.startswith((".", "~")):
        raise UserError(f"{option} {spec}: no such folder (timm model names hold no '/')")


def check_weights_file(path: str | None, option: str = "--teacher-weights") -> None:
    if path is None:
        return
    file = Path(path).expanduser()
    if not file.exists():
        raise UserError(f"{option} {path} does not exist")
    if not file.is_file():
        raise UserError(f"{option} {path} is not a file")
    if not file.name.lower().endswith(WEIGHT_SUFFIXES):
        raise UserError(f"{option} {path}: unknown weights format; expected one of {', '.join(WEIGHT_SUFFIXES)}")
