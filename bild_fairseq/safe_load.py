"""Weights-only checkpoint loading for fairseq under torch>=2.6.

torch now refuses to unpickle arbitrary globals (``weights_only=True``), which is right: a
checkpoint is code otherwise. fairseq checkpoints legitimately pickle a handful of non-tensor
object: the ``argparse.Namespace`` that holds a model's config (checked with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints written by fairseq-train,
last, best and per-update). We allow-list exactly that and nothing else. Anything else (``os.system``,
``subprocess.Popen``, ...) is refused by torch before it can run, and reported by
:func:`explain_refusal` with what to do.
"""
from __future__ import annotations

import argparse
import pickle

import torch

#: Every non-tensor global that fairseq 0.12 writes into a checkpoint (dicts, lists and
#: primitives are allowed by torch already).
FAIRSEQ_CHECKPOINT_GLOBALS: list = [argparse.Namespace]


def allow_fairseq_checkpoints() -> None:
    """Register the allow-list with torch's weights-only unpickler (idempotent)."""
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint carries a pickled global outside the fairseq allow-list."""


def explain_refusal(path: str, err: pickle.UnpicklingError) -> UnsafeCheckpointError:
    detail = str(err).split("\n")
    offending = next((line.strip() for line in detail if "global" in line.lower()), detail[-1].strip())
    return UnsafeCheckpointError(
        f"refusing to load checkpoint {path!r}: it contains a pickled object that fairseq checkpoints "
        f"never contain ({offending}). Nothing in it was executed. If you produced this file yourself, "
        "re-save it with only tensors, plain containers and argparse.Namespace; "
        "never load checkpoints from untrusted sources with weights_only=False."
    )
