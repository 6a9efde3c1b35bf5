"""wecolora: few-shot distillation of Vision Transformers by weight copy and low-rank adaptation.

The API (:mod:`wecolora.api`) is importable without torch: each function imports its layer when called.

Example:
    >>> import wecolora
    >>> wecolora.select_blocks(12, 3, "first")
    [0, 3, 6, 9]
"""
from wecolora.api import (
    ablate,
    bench,
    build_student,
    cache_entries,
    clear_cache,
    distill,
    export,
    inspect,
    knn,
    load_ablation,
    load_model,
    merge,
    plan,
    plan_student,
    pretrain,
    probe,
    report,
    select_blocks,
    views,
)
from wecolora.config import DistillConfig, KnnConfig, PlanConfig, PretrainConfig, ProbeConfig
from wecolora.errors import UserError

__version__ = "0.3.0"


def __getattr__(name: str):
    if name == "MODES":  # the mode registry lives with the students (it imports torch)
        from wecolora.method.plan import MODES

        return MODES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ablate", "bench", "build_student", "cache_entries", "clear_cache", "distill", "export", "inspect", "knn",
           "load_ablation", "load_model", "merge", "plan", "plan_student", "pretrain", "probe", "report",
           "select_blocks", "views", "DistillConfig", "KnnConfig", "PlanConfig", "PretrainConfig", "ProbeConfig",
           "UserError", "MODES"]
