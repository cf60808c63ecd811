"""Runtimes that run one model for the BiLD loop, behind one interface (:mod:`.base`).

``torch`` (the reference: the checkpoint's own modules, any device and dtype) and
``onnxruntime`` (the model exported as three graphs, fp32 or 8-bit weights, CPU).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from bild_fairseq.config import BildOptionError
from bild_fairseq.engines.base import Engine

logger = logging.getLogger("bild_fairseq")

ENGINES = ("torch", "onnxruntime")


def build_engine(model: torch.nn.Module, engine: str = "torch", int8: bool = False,
                 onnx_cache: str | Path | None = None) -> Engine:
    """``model`` on ``engine``; ``int8``: 8-bit weights (onnxruntime only). Without the
    onnxruntime package the torch engine runs, and says so once."""
    if engine not in ENGINES:
        raise BildOptionError(f"--bild-engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if int8 and engine == "torch":
        raise BildOptionError("--bild-int8 needs --bild-engine onnxruntime (8-bit weights are an ONNX Runtime "
                              "graph; the torch engine runs the checkpoint as it is)")
    if engine == "onnxruntime" and not onnxruntime_available():
        engine = "torch"
    if engine == "torch":
        from bild_fairseq.engines.torch_engine import TorchEngine

        return TorchEngine(model)
    from bild_fairseq.engines.onnx_export import ExportError
    from bild_fairseq.engines.ort_engine import OrtEngine

    try:
        return OrtEngine(model, int8, onnx_cache)
    except ExportError as e:
        raise BildOptionError(str(e)) from None


@functools.lru_cache(maxsize=None)
def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        logger.warning("onnxruntime is not installed: decoding with the torch engine instead "
                       "(pip install onnxruntime for --bild-engine onnxruntime)")
        return False
    return True
