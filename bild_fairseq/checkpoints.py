"""Inference-only fairseq checkpoints: what a pair directory ships."""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import MutableMapping, Sequence
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what to do. Loading it
    again fails the same way (the batch runner does not retry it)."""


_KEYS = re.compile(r'(Missing|Unexpected) key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)')
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(\d+)")


def load_model(path: str | Path, task) -> torch.nn.Module:
    """fairseq's ``load_model_ensemble`` for one checkpoint, its failures as one clear line:
    a model trained with another dictionary, or a truncated or damaged file."""
    from fairseq import checkpoint_utils

    from bild_fairseq.safe_load import UnsafeCheckpointError

    try:
        (model,), _ = checkpoint_utils.load_model_ensemble([str(path)], task=task)
    except UnsafeCheckpointError:
        raise  # already says what the file holds and what to do
    except RuntimeError as e:
        mismatch = _SIZE_MISMATCH.search(str(e))
        if mismatch is None:
            raise _load_error(path, e) from None
        name, rows = mismatch.groups()
        side = "source" if name.startswith("encoder.") else "target"
        dictionary = getattr(task, f"{side}_dictionary")
        raise CheckpointError(
            f"{path} was trained with another {side} dictionary: its {name} has {rows} entries, this pair's "
            f"{side} dictionary {len(dictionary)}. Use a model trained on the pair's own dictionaries "
            "(fairseq-preprocess --srcdict/--tgtdict with the pair's dict.*.txt)") from None
    except (EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:  # torch: EINVAL when truncated
        raise _unreadable(path, e) from None
    return model


def _load_error(path: str | Path, error: RuntimeError) -> CheckpointError:
    """What a ``RuntimeError`` of loading says: weights that do not fit the architecture the
    checkpoint declares, a damaged archive, or else its own first line (no guess)."""
    text = str(error)
    keys = _KEYS.findall(text)
    if keys:
        found = "; ".join(f"{kind.lower()} {len(names)} weight(s), e.g. {names[0]}"
                          for kind, names in ((kind, re.findall(r'"([^"]*)"', quoted)) for kind, quoted in keys))
        return CheckpointError(f"{path} holds weights of another architecture than its config declares ({found}): "
                               "use the checkpoint saved with this model, or export it again from its training run")
    if "PytorchStreamReader" in text or "zip archive" in text:
        return _unreadable(path, error)
    return CheckpointError(f"{path} could not be loaded: {text.strip().splitlines()[0] if text.strip() else 'RuntimeError'}")


def _unreadable(path: str | Path, error: Exception) -> CheckpointError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(f"{path} is not a readable checkpoint ({first}): the file is truncated or damaged; "
                           "copy or export it again")


def model_settings(model_cfg: argparse.Namespace | MutableMapping) -> MutableMapping:
    """A checkpoint's ``cfg["model"]`` as one mutable mapping: older fairseq saves it as an
    ``argparse.Namespace``, newer as a dict or DictConfig. Writes go through to the config."""
    return vars(model_cfg) if isinstance(model_cfg, argparse.Namespace) else model_cfg


def last_interval_checkpoints(ckpt_dir: Path, count: int) -> list[Path]:
    """fairseq-train's last ``count`` interval checkpoints (``checkpoint_E_U.pt``, by update), to be
    averaged; ``count`` <= 1: ``checkpoint_best.pt``."""
    if count <= 1:
        return [ckpt_dir / "checkpoint_best.pt"]
    interval = sorted(ckpt_dir.glob("checkpoint_*_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if len(interval) < count:
        raise CheckpointError(f"{ckpt_dir} holds {len(interval)} interval checkpoints but averaging asks for {count}: "
                              "train longer (every --save-interval-updates keeps one, up to --keep-interval-updates) "
                              "or average fewer")
    return interval[-count:]


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
    cfg = states[-1]["cfg"]
    _stock_architecture(model_settings(cfg["model"]))
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(inference_state(cfg, model, fp16), dst)
    return dst


def _stock_architecture(model_cfg: MutableMapping) -> None:
    """A model trained with a plugin-only architecture whose weights are a stock one's is shipped
    as the stock one, so that stock fairseq loads it (``transformer_frozen_encoder``)."""
    from bild_fairseq.frozen_encoder import ARCH

    if model_cfg.get("arch") == ARCH:
        model_cfg["arch"] = "transformer"
    if model_cfg.get("_name") == ARCH:
        model_cfg["_name"] = "transformer"
