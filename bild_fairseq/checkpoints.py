"""Inference-only fairseq checkpoints: what a pair directory ships."""
from __future__ import annotations

from pathlib import Path

import torch


def inference_state(cfg: dict, model_state: dict, fp16: bool = True) -> dict:
    """A checkpoint that stock fairseq loads, without optimizer state (``fp16`` halves its size;
    fairseq copies the weights into the model's own dtype on load)."""
    if fp16:
        model_state = {k: v.half() if v.is_floating_point() else v for k, v in model_state.items()}
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


def export_for_inference(src: Path, dst: Path, fp16: bool = True) -> Path:
    """Strip a fairseq-train checkpoint down to config + (fp16) weights."""
    state = torch.load(src, map_location="cpu")  # weights-only, with the fairseq allow-list
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(inference_state(state["cfg"], state["model"], fp16), dst)
    return dst
