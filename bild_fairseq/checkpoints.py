"""Inference-only fairseq checkpoints: what a pair directory ships."""
from __future__ import annotations

from pathlib import Path

import torch


def inference_state(cfg: dict, model_state: dict, fp16: bool = True) -> dict:
    """A checkpoint that stock fairseq loads, without optimizer state (``fp16`` halves its size;
    fairseq copies the weights into the model's own dtype on load)."""
    if fp16:
        model_state = _half_keeping_ties(model_state)
    return {
        "args": None,
        "cfg": cfg,
        "model": model_state,
        "optimizer_history": [
            {"criterion_name": "CrossEntropyCriterion", "optimizer_name": "none",
             "lr_scheduler_state": {"best": None}, "num_updates": 0}
        ],
        "extra_state": {"train_iterator": {"epoch": 0}},
    }


def _half_keeping_ties(state: dict) -> dict:
    """fp16 copy of a state dict in which tied tensors (shared embeddings) stay one tensor, so
    the file stores each once."""
    converted: dict = {}
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in converted:
            converted[key] = tensor.half()
        out[name] = converted[key]
    return out


def export_for_inference(src: Path, dst: Path, fp16: bool = True) -> Path:
    """Strip a fairseq-train checkpoint down to config + (fp16) weights."""
    state = torch.load(src, map_location="cpu")  # weights-only, with the fairseq allow-list
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(inference_state(state["cfg"], state["model"], fp16), dst)
    return dst
