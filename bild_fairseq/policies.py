"""BiLD's two policies (Kim et al., 2023, Sec. 3.1-3.2) as pure tensor functions.

Fallback: the small model hands over when it is not confident, max_y p_small(y) < alpha_FB, or
after ``max_small_steps`` consecutive tokens.
Rollback: after the big model has scored the small model's tokens y_1..y_k in one pass, the
first y_i with d(p_big_i, y_i) = -log p_big_i(y_i) > alpha_RB is replaced by the big model's
argmax and everything after it is dropped. Exact mode replaces the first y_i != argmax p_big_i.
Batch policy (ours; the paper decodes one sentence at a time): a sentence that hands over waits,
frozen, and the big model runs once for all waiting sentences when enough of the batch waits.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def fallback(small_max_logprob: Tensor, run_length: Tensor, fallback_threshold: float, max_small_steps: int) -> Tensor:
    """True where the small model hands over to the big model.

    small_max_logprob: (R,) log of the small model's max probability at the next position.
    run_length: (R,) consecutive small-model tokens emitted since the big model last ran.
    (Python numbers work too: the one-sentence loop decides on the host.)
    """
    not_confident = small_max_logprob < (math.log(fallback_threshold) if fallback_threshold > 0 else -math.inf)
    return not_confident | (run_length >= max_small_steps)


def first_rollback(big_logprobs: Tensor, small_tokens: Tensor, checkable: Tensor,
                   rollback_threshold: float, exact: bool) -> Tensor:
    """Index of the first small-model token the big model rejects, or K where none is rejected.

    big_logprobs: (R, K, V) the big model's log-distribution at each proposed position.
    small_tokens: (R, K) the small model's tokens at those positions.
    checkable: (R, K) False for padding and for tokens the search forced (e.g. EOS at max length).
    """
    if exact:
        rejected = small_tokens != big_logprobs.argmax(-1)
    else:
        cross_entropy = -big_logprobs.gather(-1, small_tokens.unsqueeze(-1)).squeeze(-1)
        rejected = cross_entropy > rollback_threshold
    rejected = rejected & checkable
    k = small_tokens.size(1)
    positions = torch.arange(k, device=small_tokens.device).expand_as(small_tokens)
    return torch.where(rejected, positions, k).min(dim=1).values if k > 0 else small_tokens.new_zeros(small_tokens.size(0))


def big_pass_due(waiting: Tensor, waited: Tensor, unfinished: Tensor, wait_share: float, max_wait: int) -> Tensor:
    """() bool: run the big model now, for every sentence waiting for it.

    Due when some sentence waits and either at least ``wait_share`` of the unfinished sentences
    wait (0: as soon as one does, the per-sentence policy; 1: only when all do), or one has waited
    ``max_wait`` loop iterations (no sentence starves). A waiting sentence is frozen, so when
    the pass runs changes only the batch's cost, never the sentence's output.

    waiting, unfinished: (R,) bool; waited: (R,) iterations each has waited so far.
    """
    n_waiting = waiting.sum()
    enough = n_waiting >= wait_share * unfinished.sum()
    overdue = (waiting & (waited >= max_wait)).any()
    return (n_waiting > 0) & (enough | overdue)
