"""Inference-only fairseq checkpoints: what a pair directory ships."""
from __future__ import annotations

from collections.abc import Sequence
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


def _map_keeping_ties(state: dict, convert) -> dict:
    """Apply ``convert(name, tensor)`` to every floating-point tensor of a state dict, once per
    tied tensor (shared embeddings), so the result keeps the ties and the file stores each once."""
    converted: dict = {}
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in converted:
            converted[key] = convert(name, tensor)
        out[name] = converted[key]
    return out


def _half_keeping_ties(state: dict) -> dict:
    return _map_keeping_ties(state, lambda _, tensor: tensor.half())


def average_states(states: Sequence[dict]) -> dict:
    """Element-wise mean of model state dicts of one architecture (fairseq's
    ``scripts/average_checkpoints.py``: the mean of the last few checkpoints of a run usually
    generalises better than any one of them)."""
    def mean(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return (sum(s[name].double() for s in states) / len(states)).to(tensor.dtype)
    return _map_keeping_ties(states[0], mean)


def export_for_inference(src: Path | Sequence[Path], dst: Path, fp16: bool = True) -> Path:
    """Strip a fairseq-train checkpoint down to config + (fp16) weights; given several
    checkpoints of one run, ship the average of their weights."""
    sources = [src] if isinstance(src, Path) else list(src)
    # weights-only loads, with the fairseq allow-list
    states = [torch.load(path, map_location="cpu") for path in sources]
    model = average_states([s["model"] for s in states])  # the mean of one is that one, exactly
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(inference_state(states[-1]["cfg"], model, fp16), dst)
    return dst
