"""fairseq's per-step search rules, applied identically to both models' distributions.

``SequenceGenerator`` never chooses pad, subtracts ``--unkpen`` from unk, bans suppressed tokens,
bans EOS before ``--min-len`` and forces EOS at the length limit. The token-independent part is
one additive bias over the vocabulary, computed once; only the EOS column and the rows at their
length limit depend on the step. :func:`constrain` is the whole rule set as a few tensor ops with
no host sync, so an engine can also run it inside its graph (the ONNX Runtime engine does).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Scores(NamedTuple):
    """What an engine returns for each fed token: the constrained log-distribution of the next
    token and its maximum (value and index, the first one on ties)."""

    lprobs: Tensor  # (..., V)
    best_lp: Tensor  # (...)
    best: Tensor  # (...)


def constrain(lprobs: Tensor, bias: Tensor, eos: int, min_len: Tensor | int, step: Tensor, max_len: Tensor) -> Tensor:
    """Constrained log-probabilities. lprobs: (..., V); ``step`` (the number of target tokens
    before the predicted one) and ``max_len`` broadcast against ``lprobs[..., 0]``."""
    lprobs = lprobs.masked_fill(lprobs.isnan(), -math.inf) + bias  # NaN is never chosen
    eos_column = lprobs[..., eos:eos + 1].masked_fill((step < min_len).unsqueeze(-1), -math.inf)
    lprobs = lprobs.masked_fill((step >= max_len).unsqueeze(-1), -math.inf)
    return torch.cat([lprobs[..., :eos], eos_column, lprobs[..., eos + 1:]], dim=-1)


class SearchRules:
    def __init__(self, vocab_size: int, pad: int, unk: int, eos: int, unk_penalty: float = 0.0,
                 suppress: Tensor | None = None, min_len: int = 1, device=None):
        bias = torch.zeros(vocab_size, device=device)
        bias[pad] = -math.inf
        bias[unk] -= unk_penalty
        if suppress is not None:
            bias[suppress.long()] = -math.inf
        self.bias, self.eos, self.min_len = bias, eos, min_len

    def to(self, device) -> "SearchRules":
        self.bias = self.bias.to(device)
        return self

    def apply(self, lprobs: Tensor, step: Tensor, max_len: Tensor) -> Tensor:
        """:func:`constrain` with this generator's rules."""
        return constrain(lprobs, self.bias, self.eos, self.min_len, step, max_len)

    def scores(self, lprobs: Tensor, step: Tensor, max_len: Tensor) -> Scores:
        constrained = self.apply(lprobs, step, max_len)
        best_lp, best = constrained.max(dim=-1)
        return Scores(constrained, best_lp, best)
