"""A small model that shares the big model's encoder (``bild-jobs distill --share-encoder``).

Such a small model is a stock fairseq transformer whose encoder is a copy of the big model's
(trained frozen, and shipped with the weights so that stock fairseq loads it on its own). When
the two encoders are the same modules with the same weights, BiLD runs the big one only and the
small decoder reads its output: the same computation gives the same states, so sharing changes
no output, only the cost (one encoder pass per batch instead of two). If the big model is later
replaced, the encoders differ and the small model runs its own copy, as any small model does.
"""
from __future__ import annotations

import torch


def structure(part: torch.nn.Module) -> str:
    """An encoder's or decoder's modules and the settings that are not weights (embedding
    scale, padding index, positions, pre-/post-norm): equal weights and equal structure
    compute the same function."""
    layers = [getattr(layer, "normalize_before", None) for layer in part.layers]
    return f"{part}|{getattr(part, 'embed_scale', None)}|{part.padding_idx}|{part.max_positions()}|{layers}"


def same_encoder(big: torch.nn.Module, small: torch.nn.Module) -> bool:
    """Whether ``small``'s encoder computes exactly what ``big``'s does (same structure, same
    weights bit for bit, same dtype and device)."""
    if big.encoder is small.encoder:
        return True
    if structure(big.encoder) != structure(small.encoder):
        return False
    a, b = big.encoder.state_dict(), small.encoder.state_dict()
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].device == b[k].device and torch.equal(a[k], b[k]) for k in a)
