"""One precision option for both models, wherever they decode or train: fp32, fp16 or bf16.

fp16 is a GPU precision: on the CPU torch's half-precision kernels are slow where they exist at
all, so it is refused there with one line. bf16 runs on both (on a GPU it keeps fp32's range).
"""
from __future__ import annotations

import torch

from bild_fairseq.config import PRECISIONS, BildOptionError  # noqa: F401  (PRECISIONS: re-exported)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: fairseq's own flag for each precision (fairseq-generate, fairseq-train)
FAIRSEQ_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}


def check_precision(precision: str, device: str) -> None:
    """Refuse an unknown precision, and fp16 anywhere but on a GPU."""
    if precision not in PRECISIONS:
        raise BildOptionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and not str(device).startswith("cuda"):
        raise BildOptionError(f"fp16 needs a GPU (asked on {device}): on the CPU use bf16 or fp32")


def precision_of(model: torch.nn.Module) -> str:
    """The precision a model's weights are in (what a run records)."""
    dtype = next(model.parameters()).dtype
    return next((name for name, d in DTYPES.items() if d == dtype), "fp32")
