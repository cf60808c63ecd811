"""BiLD's policies on hand-built distributions (paper Sec. 3.1-3.2)."""
import math

import torch

from bild_fairseq.policies import big_pass_due, fallback, first_rollback


def logp(*probs):
    return torch.tensor(probs).log()


def test_fallback_boundary_is_strictly_below_threshold():
    max_lp = logp(0.59, 0.6, 0.61)
    run = torch.zeros(3, dtype=torch.long)
    assert fallback(max_lp, run, 0.6, 10).tolist() == [True, False, False]


def test_fallback_after_max_small_steps_even_when_confident():
    max_lp = logp(0.99, 0.99, 0.99)
    run = torch.tensor([8, 9, 10])
    assert fallback(max_lp, run, 0.6, 10).tolist() == [False, False, True]


def test_fallback_thresholds_zero_and_one_mean_never_and_always():
    max_lp = logp(1e-6, 0.5, 0.999999)
    run = torch.zeros(3, dtype=torch.long)
    assert not fallback(max_lp, run, 0.0, 10).any()
    assert fallback(max_lp, run, 1.0, 10).all()
    # a certain prediction (p == 1, e.g. a forced token) is not "below" 1
    assert not fallback(torch.zeros(1), torch.zeros(1, dtype=torch.long), 1.0, 10).any()


def _big(rows):
    """(R, K, V=3) big-model log-distributions from lists of probability triples."""
    return torch.tensor(rows).log()


def test_rollback_cuts_at_first_offender_not_worst():
    # token 0 fine (p=.9), token 1 bad (p=.01 -> 4.6 nats), token 2 worse (p=.001)
    lp = _big([[[0.9, 0.05, 0.05], [0.98, 0.01, 0.01], [0.998, 0.001, 0.001]]])
    small = torch.tensor([[0, 1, 2]])
    checkable = torch.ones(1, 3, dtype=torch.bool)
    assert first_rollback(lp, small, checkable, 4.0, exact=False).tolist() == [1]
    assert first_rollback(lp, small, checkable, 5.0, exact=False).tolist() == [2]  # 4.6 <= 5 < 6.9
    assert first_rollback(lp, small, checkable, 7.0, exact=False).tolist() == [3]  # none -> K


def test_rollback_threshold_zero_rejects_any_uncertain_token_and_huge_rejects_none():
    lp = _big([[[0.9, 0.05, 0.05], [0.5, 0.4, 0.1]]])
    small = torch.tensor([[0, 0]])
    checkable = torch.ones(1, 2, dtype=torch.bool)
    assert first_rollback(lp, small, checkable, 0.0, exact=False).tolist() == [0]
    assert first_rollback(lp, small, checkable, 1e9, exact=False).tolist() == [2]


def test_exact_rolls_back_on_any_disagreement_with_big_argmax():
    lp = _big([[[0.5, 0.4, 0.1], [0.3, 0.6, 0.1]], [[0.5, 0.4, 0.1], [0.3, 0.6, 0.1]]])
    small = torch.tensor([[0, 0], [0, 1]])
    checkable = torch.ones(2, 2, dtype=torch.bool)
    assert first_rollback(lp, small, checkable, math.inf, exact=True).tolist() == [1, 2]


def test_padding_and_forced_tokens_are_never_rolled_back():
    lp = _big([[[0.98, 0.01, 0.01], [0.98, 0.01, 0.01]]])
    small = torch.tensor([[1, 1]])
    checkable = torch.tensor([[False, True]])
    assert first_rollback(lp, small, checkable, 1.0, exact=False).tolist() == [1]
    assert first_rollback(lp, small, torch.zeros(1, 2, dtype=torch.bool), 1.0, exact=True).tolist() == [2]


def _due(waiting, waited, unfinished, share, max_wait):
    b = lambda xs: torch.tensor(xs, dtype=torch.bool)  # noqa: E731
    return bool(big_pass_due(b(waiting), torch.tensor(waited), b(unfinished), share, max_wait))


def test_big_pass_waits_for_a_share_of_the_unfinished_sentences():
    # 2 of 4 unfinished sentences wait (the fifth is finished and does not count)
    waiting, waited, unfinished = [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]
    assert _due(waiting, waited, unfinished, 0.5, 10)
    assert not _due(waiting, waited, unfinished, 0.6, 10)
    assert _due([1, 0, 0, 0, 0], [0, 0, 0, 0, 0], unfinished, 0.0, 10)  # share 0: the per-sentence policy


def test_big_pass_never_runs_for_nobody_and_always_runs_when_all_wait():
    assert not _due([0, 0], [0, 0], [1, 1], 0.0, 1)
    assert _due([1, 1], [0, 0], [1, 1], 1.0, 1000)
    assert _due([1, 0], [0, 0], [1, 0], 1.0, 1000)  # the only unfinished sentence waits


def test_a_sentence_that_waited_max_wait_iterations_forces_the_pass():
    unfinished = [1, 1, 1, 1]
    assert not _due([1, 0, 0, 0], [2, 0, 0, 0], unfinished, 1.0, 3)
    assert _due([1, 0, 0, 0], [3, 0, 0, 0], unfinished, 1.0, 3)
    assert not _due([0, 1, 0, 0], [5, 0, 0, 0], unfinished, 1.0, 3)  # a stale count of a drafting one
