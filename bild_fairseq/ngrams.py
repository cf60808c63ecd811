"""``--no-repeat-ngram-size`` in BiLD's loop: both models' proposals and the big model's
verification ban, for each prefix, every token that would repeat an n-gram already in it.

fairseq's SequenceGenerator bans the same tokens (its NGramRepeatBlock), once its CPU path is
given the generated prefix rather than the whole padded buffer (see fairseq_glue, hook 6).
Here the ban runs on the host after the engine's call, and the argmax is taken again: the
n-grams of a prefix are not a tensor rule an engine could fuse.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from bild_fairseq.rules import Scores


def repeat_bans(tokens: list[int], ends: list[int], size: int) -> list[tuple[int, int]]:
    """(j, token) for each prefix ``tokens[:ends[j]]`` (BOS included) and each token that would
    complete an n-gram of ``size`` tokens that the prefix already holds."""
    seen: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for i in range(max(ends) - size + 1):
        seen.setdefault(tuple(tokens[i:i + size - 1]), []).append((i + size - 1, tokens[i + size - 1]))
    return [(j, token) for j, end in enumerate(ends) if end >= size - 1
            for last, token in seen.get(tuple(tokens[end - size + 1:end]), ()) if last < end]


def block_repeats(scores: Scores, tokens: Tensor | list[list[int]], lengths: Tensor | list[list[int]],
                  size: int) -> Scores:
    """``scores`` (R, V) or (R, K, V) of the token after each prefix ``tokens[r, :lengths[r(, k)]]``,
    with the repeating tokens at -inf and the maximum taken again. ``tokens`` and ``lengths``
    may be host lists (R rows; lengths R x K): the one-sentence loop keeps its state in lists."""
    ends = lengths.reshape(lengths.size(0), -1).tolist() if isinstance(lengths, Tensor) else lengths
    rows = tokens.tolist() if isinstance(tokens, Tensor) else tokens
    banned = [(r, j, token) for r, (row, row_ends) in enumerate(zip(rows, ends))
              for j, token in repeat_bans(row, row_ends, size)]
    if not banned:
        return scores
    lprobs = scores.lprobs.reshape(len(ends), len(ends[0]), -1).clone()
    rows, entries, columns = torch.tensor(banned, device=lprobs.device).unbind(1)
    lprobs[rows, entries, columns] = -math.inf
    lprobs = lprobs.reshape(scores.lprobs.shape)
    best_lp, best = lprobs.max(dim=-1)
    return Scores(lprobs, best_lp, best)
