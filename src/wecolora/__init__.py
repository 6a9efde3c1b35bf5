"""wecolora: few-shot distillation of Vision Transformers by weight copy and low-rank adaptation."""
from .adapters import merge
from .errors import UserError
from .student import MODES, build_student, select_blocks

__all__ = ["build_student", "merge", "select_blocks", "MODES", "UserError"]
__version__ = "0.1.0"
