"""wecolora: few-shot distillation of Vision Transformers by weight copy and low-rank adaptation."""
from .errors import UserError

# The API is imported on first use so that ``wecolora --help`` and early input errors do not pay
# for importing torch.
_LAZY = {"merge": "adapters", "MODES": "student", "build_student": "student", "select_blocks": "student"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["build_student", "merge", "select_blocks", "MODES", "UserError"]
__version__ = "0.3.0"
