"""fairseq's per-step search rules, applied identically to both models' distributions.

``SequenceGenerator`` never chooses pad, subtracts ``--unkpen`` from unk, bans suppressed tokens,
bans EOS before ``--min-len`` and forces EOS at the length limit. The token-independent part is
one additive bias over the vocabulary, computed once; only the EOS column and the rows at their
length limit depend on the step. Six tensor ops per call, whatever the shape, no host sync.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


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
        """Constrained log-probabilities. lprobs: (..., V); ``step`` (the number of target tokens
        before the predicted one) and ``max_len`` broadcast against ``lprobs[..., 0]``."""
        lprobs = torch.nan_to_num(lprobs, nan=-math.inf, posinf=math.inf, neginf=-math.inf) + self.bias
        eos = lprobs[..., self.eos].masked_fill(step < self.min_len, -math.inf)
        lprobs = lprobs.masked_fill((step >= max_len).unsqueeze(-1), -math.inf)
        lprobs[..., self.eos] = eos
        return lprobs
