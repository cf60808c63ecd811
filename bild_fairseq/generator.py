"""BiLD as a fairseq SequenceGenerator: the small model proposes, the big model verifies.

Per batch (every sentence keeps its own state; the big model runs only on sentences that need it):

    encode the batch with both encoders (once, when the small model shares the big encoder)
    while some sentence is unfinished:
        propose (small model): feed each drafting sentence's newest token, take the argmax of
            the next position; fallback policy: confident and under max-small-steps -> keep the
            proposal, else (or on a proposed EOS) the sentence waits for the big model, frozen
        batch policy: is a big pass due (enough of the batch waits, or one waited too long)?
        read the iteration's counters (the loop's one host sync): how many sentences the big
            model verifies, how many unseen tokens, who finished -> finished sentences leave
        verify (big model), when due, for the waiting sentences (and, with verify_drafting,
            the drafting ones with unchecked tokens): one pass over all their unseen tokens ->
            rollback policy on the small tokens since its last pass;
            rejected -> replace the first rejected token by the big argmax, cut the rest,
                        truncate both caches
            accepted -> waiting: a verified EOS ends the sentence, else append the big model's
                        next token; drafting: nothing changes, it drafts on

Neither waiting nor early checks change a sentence's output (in exact or lossy mode): a waiting
sentence is frozen, and a drafting one's tokens are each checked once against the same big-model
distribution whenever its pass happens, the first rejection cutting as a later pass would. With no
small model the same tokens come from a plain greedy loop (:meth:`_greedy`, the project's own
big-only baseline). Deliberate deviations from the official BiLD code are listed in the README.

The models run on an engine (:mod:`bild_fairseq.engines`: torch or ONNX Runtime) that returns
each call's constrained scores and argmax. Per-step cost: the small model always feeds exactly
one token per sentence (its cache is kept one token behind), so proposing uses the engine's
one-token ``step``; so does verification when every sentence has one unseen token. In a batch
every decision stays on the device, and counters are read once per iteration as one small
tensor; a batch of one sentence runs the same decisions on host scalars (:meth:`_bild_one`),
where per-row tensor bookkeeping would cost more than a small step.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from fairseq.sequence_generator import SequenceGenerator

from bild_fairseq.config import BildOptionError, check_batch_policy, check_thresholds
from bild_fairseq.engines import build_engine
from bild_fairseq.incremental import DecoderCache
from bild_fairseq.ngrams import block_repeats
from bild_fairseq.policies import big_pass_due, fallback, first_rollback
from bild_fairseq.rules import Scores, SearchRules
from bild_fairseq.sharing import same_encoder
from bild_fairseq.stats import BildStats

#: the per-batch counters kept on the device (BildStats fields)
COUNTERS = ("small_steps", "fallbacks", "eos_checks", "big_calls", "big_passes", "early_checks", "rollbacks")
#: the counters counted per sentence first: the proposal's events, then the verification's
PROPOSAL_EVENTS, VERIFY_EVENTS = ("small_steps", "fallbacks", "eos_checks"), ("rollbacks", "early_checks")
EVENTS = PROPOSAL_EVENTS + VERIFY_EVENTS


class BildSequenceGenerator(SequenceGenerator):
    """Greedy BiLD decoding of ``models[0]`` (big) with ``small_model``; SequenceGenerator's contract."""

    def __init__(self, models, tgt_dict, small_model=None, fallback_threshold: float = 0.6,
                 rollback_threshold: float = 5.0, max_small_steps: int = 10, exact: bool = False,
                 wait_share: float = 0.0, max_wait: int = 1000, verify_drafting: bool = False,
                 engine: str = "torch", int8: bool = False, onnx_cache: str | None = None, **kwargs):
        if kwargs.get("beam_size", 1) != 1:
            raise BildOptionError(f"BiLD decodes greedily: use --beam 1 (got --beam {kwargs['beam_size']})")
        if len(models) != 1:
            raise BildOptionError(f"BiLD pairs one big model with one small model; got an ensemble of {len(models)}")
        if kwargs.get("match_source_len", False):
            raise BildOptionError("BiLD does not support --match-source-len")
        if kwargs.get("temperature", 1.0) != 1.0:
            raise BildOptionError("BiLD's policies are defined on the models' own distributions: use --temperature 1")
        check_thresholds(fallback_threshold, rollback_threshold, max_small_steps)
        check_batch_policy(wait_share, max_wait)
        super().__init__(models, tgt_dict, **kwargs)
        if small_model is not None:
            small_model.eval()
            self.max_len = min(self.max_len, small_model.max_decoder_positions())
            small_vocab = small_model.decoder.output_projection.out_features
            if small_vocab != len(tgt_dict):
                raise BildOptionError(
                    f"the small model's target dictionary has {small_vocab} entries but the big model's has "
                    f"{len(tgt_dict)}: BiLD needs both models trained on the same (joined) dictionary")
        self.small_model = small_model
        self.big = build_engine(models[0], engine, int8, onnx_cache)
        self.small = build_engine(small_model, engine, int8, onnx_cache) if small_model is not None else None
        #: the small model decodes from the big encoder's output (bild_fairseq.sharing)
        self.shared_encoder = small_model is not None and same_encoder(models[0], small_model)
        self.fallback_threshold = fallback_threshold
        self.rollback_threshold = rollback_threshold
        self.max_small_steps = max_small_steps
        self.exact = exact
        self.wait_share, self.max_wait, self.verify_drafting = wait_share, max_wait, verify_drafting
        self.rules = SearchRules(len(tgt_dict), self.pad, self.unk, self.eos, self.unk_penalty,
                                 self.token_indices_to_suppress, self.min_len)
        self.no_repeat_ngram_size = kwargs.get("no_repeat_ngram_size", 0)
        self.stats = BildStats()

    # -- SequenceGenerator contract ---------------------------------------------------------

    @torch.no_grad()
    def _generate(self, sample, prefix_tokens=None, constraints=None, bos_token=None):
        if prefix_tokens is not None or constraints is not None:
            raise BildOptionError("BiLD does not support --prefix-size or --constraints")
        net_input = sample["net_input"]
        src_tokens = net_input["src_tokens"]
        bsz, device = src_tokens.size(0), src_tokens.device
        # per-sentence max length a * source + b, the source counted as fairseq counts it (EOS
        # included) and in double precision as its Python arithmetic does: at batch 1 exactly
        # stock's limit. fairseq takes the padded batch width instead, which makes a sentence's
        # output depend on its batch-mates when max_len_a > 0; we keep each sentence's own.
        source = src_tokens.ne(self.pad).long().sum(dim=1)
        max_len = torch.clamp((self.max_len_a * source.double() + self.max_len_b).long(), max=self.max_len - 1)
        if self.min_len > int(max_len.min()):
            raise BildOptionError("min_len cannot be larger than max_len, please adjust these!")
        if self.rules.bias.device != device:
            self.rules.to(device)

        src_lengths = net_input["src_lengths"]
        encoded = self.big.encode(src_tokens, src_lengths)
        big_cache, small_cache = self.big.start(encoded), None
        if self.small is not None:
            small_cache = self.small.start(encoded if self.shared_encoder else self.small.encode(src_tokens, src_lengths))
        state = _BatchState(bsz, int(max_len.max()) + 3, device, self.eos if bos_token is None else bos_token, max_len)
        hypotheses: list[list[dict]] = [[] for _ in range(bsz)]
        if small_cache is None:
            iterations = self._greedy(state, big_cache, hypotheses)
        elif bsz == 1:
            iterations = self._bild_one(state, big_cache, small_cache, hypotheses)
        else:
            iterations = self._bild(state, big_cache, small_cache, hypotheses)
        state.fold_events()
        self.stats.sentences += bsz
        self.stats.iterations += iterations
        for name, value in zip(COUNTERS, state.counters.tolist()):
            setattr(self.stats, name, getattr(self.stats, name) + int(value))
        return hypotheses

    def _bild(self, state: "_BatchState", big_cache: DecoderCache, small_cache: DecoderCache,
              hypotheses: list[list[dict]]) -> int:
        """The BiLD loop (see the module docstring) until every sentence has finished; returns
        its iteration count."""
        n_max, iterations = 1, 0
        while True:
            iterations += 1
            self._propose(state, small_cache, n_max + 1)
            state.plan(big_cache.length, self.wait_share, self.max_wait, self.verify_drafting)
            n_need, k_max, n_max, n_done = state.read(big_cache.length)
            if n_done and self._retire(state, (big_cache, small_cache), hypotheses):
                return iterations
            if n_need:
                self._verify(state, big_cache, small_cache, n_need, k_max, n_max)

    def _bild_one(self, s: "_BatchState", big_cache: DecoderCache, small_cache: DecoderCache,
                  hypotheses: list[list[dict]]) -> int:
        """The BiLD loop for one sentence (interactive use), its state on the host: the decisions
        of :meth:`_bild` at batch 1 (same policy functions, same model calls with the same
        arguments; ``tests/test_generator.py`` checks the outputs equal), without the per-row
        tensor bookkeeping, which costs more than a small step on a fast engine (BENCHMARKS.md,
        "Engines"). At batch 1 a sentence that hands over is verified at once, never waits."""
        tokens, scores, from_big = [int(s.tokens[0, 0])], [0.0], [False]
        counts = dict.fromkeys(COUNTERS, 0)
        device = s.tokens.device  # the lists live on the host; what the models read goes to their device
        one, max_len = torch.zeros(1, dtype=torch.long, device=device), s.max_len
        limit, run, iterations, n_read = int(max_len[0]), 0, 0, 1
        while True:
            iterations += 1
            _, best_lp, best = self._ban(self.small.step(small_cache, torch.tensor([tokens[-1]], device=device),
                                                         n_read + 1, self.rules, max_len), [tokens], [[len(tokens)]])
            best, best_lp = int(best[0]), float(best_lp[0])
            counts["small_steps"] += 1
            hand_over = fallback(best_lp, run, self.fallback_threshold, self.max_small_steps)
            if not hand_over:
                tokens.append(best), scores.append(0.0), from_big.append(False)
                run += 1
            n_read = len(tokens)
            if not hand_over and best != self.eos:
                continue
            counts["fallbacks" if hand_over else "eos_checks"] += 1
            # verify every token the big model has not seen in one pass (its cache is one behind)
            start = int(big_cache.length[0])
            k = len(tokens) - start
            feed = torch.tensor([tokens[start:]], device=device)
            if k == 1:
                lprobs, big_best_lp, big_best = (x.unsqueeze(1) for x in self.big.step(
                    big_cache, feed[:, 0], n_read, self.rules, max_len))
            else:
                lprobs, big_best_lp, big_best = self.big.forward(big_cache, one, feed, torch.tensor([k], device=device),
                                                                 n_read, True, self.rules, max_len)
            lprobs, big_best_lp, big_best = self._ban(Scores(lprobs, big_best_lp, big_best), [tokens],
                                                      [range(start + 1, start + 1 + k)])
            proposals = torch.tensor([tokens[start + 1:] + [self.eos]], device=device)  # the last entry: not checked
            checkable = torch.tensor([[j < k - 1 and start + j < limit for j in range(k)]], device=device)
            cut = min(int(first_rollback(lprobs, proposals, checkable, self.rollback_threshold, self.exact)[0]), k - 1)
            accepted = lprobs[0, :cut].gather(-1, proposals[0, :cut].unsqueeze(-1)).squeeze(-1).tolist()
            scores[start + 1:start + 1 + cut] = accepted
            rolled = cut < k - 1
            verified_eos = not rolled and len(tokens) > 1 and tokens[-1] == self.eos
            big_token, big_lp = int(big_best[0, cut]), float(big_best_lp[0, cut])
            counts["rollbacks"] += rolled
            counts["big_calls"] += 1
            counts["big_passes"] += 1
            if not verified_eos:  # the big model's own token at the cut
                del tokens[start + 1 + cut:], scores[start + 1 + cut:], from_big[start + 1 + cut:]
                tokens.append(big_token), scores.append(big_lp), from_big.append(True)
            if verified_eos or big_token == self.eos:
                break
            for cache in (big_cache, small_cache):
                cache.truncate(one, torch.tensor([len(tokens) - 1], device=device))
            run = 0
        n = len(tokens)
        s.tokens[0, :n], s.scores[0, :n], s.from_big[0, :n] = (torch.tensor(x, device=device)
                                                              for x in (tokens, scores, from_big))
        s.n[0], s.finished[0] = n, True
        s.counters += torch.tensor([counts[name] for name in COUNTERS], device=device)
        self._retire(s, (big_cache, small_cache), hypotheses)
        return iterations

    def _greedy(self, s: "_BatchState", cache: DecoderCache, hypotheses: list[list[dict]]) -> int:
        """No small model: greedy decoding, one one-token pass per iteration (BiLD's big-only
        baseline, and ``--bild-engine`` without ``--bild``). BiLD's loop would give the same
        tokens (every proposal is the big model's own); this one skips its bookkeeping."""
        n_max, calls, last = 1, 0, s.tokens[:, 0]
        s.from_big[:] = True  # every token is the big model's
        while True:
            _, best_lp, best = self._ban(self.big.step(cache, last, n_max, self.rules, s.max_len), s.tokens, s.n)
            at = s.n.unsqueeze(1)
            s.tokens.scatter_(1, at, best.unsqueeze(1))
            s.scores.scatter_(1, at, best_lp.unsqueeze(1))
            s.n += 1  # every sentence advances: the longest has n_max + 1 tokens
            s.finished = best == self.eos
            last, n_max, calls = best, n_max + 1, calls + s.size
            if s.finished.any():  # the loop's one host read per iteration
                keep = ~s.finished
                if self._retire(s, (cache,), hypotheses):
                    break
                last = last[keep]
        s.big_calls, s.big_passes = s.big_calls + calls, s.big_passes + n_max - 1
        return n_max - 1

    def _ban(self, scores: Scores, tokens: Tensor | list, lengths: Tensor | list) -> Scores:
        """--no-repeat-ngram-size on the scores after the prefixes ``tokens[r, :lengths[r(, k)]]``
        (tensors, or the one-sentence loop's host lists: nothing is converted when no ban is set)."""
        return block_repeats(scores, tokens, lengths, self.no_repeat_ngram_size) if self.no_repeat_ngram_size \
            else scores

    def _retire(self, s: "_BatchState", caches: tuple[DecoderCache, ...], hypotheses: list[list[dict]]) -> bool:
        """Finished sentences leave the batch and its caches; True when none is left."""
        done, keep = s.finished.nonzero().squeeze(1), (~s.finished).nonzero().squeeze(1)
        for sentence, hypo in zip(s.ids[done].tolist(), self._hypotheses(s, done)):
            hypotheses[sentence] = [hypo]
        if keep.numel() == 0:
            return True
        s.select(keep)
        for cache in caches:
            cache.select(keep)
        return False

    def _propose(self, s: "_BatchState", cache: DecoderCache, visible: int) -> None:
        """Small model proposes one token for every drafting sentence; hand-overs start waiting.

        Its cache holds every token but the newest, so it feeds exactly that one token. Waiting
        and finished sentences ride along (a one-row gather would cost more than their rows):
        waiting ones write a scratch slot past their cache length, which is then left there."""
        last = s.tokens.gather(1, (s.n - 1).unsqueeze(1)).squeeze(1)
        _, best_lp, best = self._ban(self.small.step(cache, last, visible, self.rules, s.max_len), s.tokens, s.n)
        cache.length -= s.waiting.long()  # already waited: this step's slot was scratch
        s.waited += s.waiting
        active = ~s.finished & ~s.waiting
        hand_over = fallback(best_lp, s.run, self.fallback_threshold, self.max_small_steps) & active
        keep = active & ~hand_over
        # written at every row's next position; only kept rows advance over it
        s.tokens.scatter_(1, s.n.unsqueeze(1), best.unsqueeze(1))
        s.from_big.scatter_(1, s.n.unsqueeze(1), False)
        s.n += keep
        s.run += keep
        # a small-model EOS ends the sentence only once the big model has verified it
        eos_check = keep & (best == self.eos)
        s.waiting |= hand_over | eos_check
        s.events[:len(PROPOSAL_EVENTS)] += torch.stack((active, hand_over, eos_check))

    def _verify(self, s: "_BatchState", cache: DecoderCache, small_cache: DecoderCache | None,
                n_need: int, k_max: int, n_max: int) -> None:
        """One parallel big-model pass over each chosen sentence's unseen tokens, then rollback."""
        all_rows = n_need == s.size
        rows = torch.arange(s.size, device=s.n.device) if all_rows else torch.nonzero_static(
            s.needs_big, size=n_need).squeeze(1)
        start, n, max_len = cache.length[rows], s.n[rows], s.max_len[rows]
        counts = n - start
        entry = torch.arange(k_max, device=rows.device).unsqueeze(0)
        positions = start.unsqueeze(1) + 1 + entry  # entry j predicts the token at start + 1 + j
        tokens = s.tokens[rows]
        if k_max == 1 and all_rows:  # every sentence has one unseen token: the one-token pass
            scores = self.big.step(cache, tokens.gather(1, start.unsqueeze(1)).squeeze(1), n_max, self.rules, max_len)
            lprobs, big_best_lp, big_best = (x.unsqueeze(1) for x in scores)
        else:
            feed = tokens.gather(1, (positions - 1).clamp(max=tokens.size(1) - 1))
            lprobs, big_best_lp, big_best = self.big.forward(cache, rows, feed, counts, n_max, all_rows, self.rules,
                                                             max_len)
        lprobs, big_best_lp, big_best = self._ban(Scores(lprobs, big_best_lp, big_best), tokens,
                                                  torch.minimum(positions, n.unsqueeze(1)))
        # entries 0 .. counts-2 score the small model's tokens since the big model's last pass;
        # tokens the search forced (EOS at max length) are not the small model's choice
        at = positions.clamp(max=tokens.size(1) - 1)
        proposals = tokens.gather(1, at)
        checkable = (entry < (counts - 1).unsqueeze(1)) & (positions - 1 < max_len.unsqueeze(1))
        cut = torch.minimum(first_rollback(lprobs, proposals, checkable, self.rollback_threshold, self.exact),
                            counts - 1)
        rolled = cut < counts - 1
        # the big model's scores for the small tokens it accepted (other entries keep theirs)
        proposal_scores = lprobs.gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
        old_scores = s.scores[rows.unsqueeze(1), at]
        s.scores[rows.unsqueeze(1), at] = torch.where(entry < cut.unsqueeze(1), proposal_scores, old_scores)
        # the big model's own token goes at the cut (the rejected position, or the next one) of
        # waiting sentences and of drafting ones it rejects; a drafting one it accepts drafts on
        waiting = s.waiting[rows]
        placed = waiting | rolled
        r = torch.arange(rows.numel(), device=rows.device)
        big_lp, big_token = big_best_lp[r, cut], big_best[r, cut]
        verified_eos = waiting & ~rolled & (n > 1) & (tokens[r, n - 1] == self.eos)
        new_n = torch.where(placed, start + 1 + cut, n)  # == n for a verified EOS: nothing appended
        s.tokens[rows, new_n] = torch.where(placed, big_token, s.tokens[rows, new_n])
        s.from_big[rows, new_n] = placed
        s.scores[rows, new_n] = torch.where(placed, big_lp, s.scores[rows, new_n])
        n = new_n + (placed & ~verified_eos)
        s.n[rows] = n
        s.finished[rows] = placed & (verified_eos | (big_token == self.eos))
        # both caches keep only tokens before the newest one, which neither model has consumed
        for c in (cache, small_cache):
            if c is not None:
                c.truncate(rows, n - 1)
        s.run[rows] = torch.where(placed, 0, s.run[rows])
        s.waiting[rows] = False
        s.waited[rows] = 0
        s.needs_big[rows] = False
        s.events[len(PROPOSAL_EVENTS):, rows] += torch.stack((rolled, ~waiting))
        s.big_calls, s.big_passes = s.big_calls + n_need, s.big_passes + 1

    def _hypotheses(self, s: "_BatchState", rows: Tensor) -> list[dict]:
        """SequenceGenerator's hypothesis dicts for finished sentences ``rows``; counts their tokens."""
        out = []
        for b, n in zip(rows.tolist(), s.n[rows].tolist()):
            tokens = s.tokens[b, 1:n].clone()
            pos_scores = s.scores[b, 1:n].clone()
            score = pos_scores.sum()
            if self.normalize_scores:
                score = score / (tokens.numel() ** self.len_penalty)
            out.append({"tokens": tokens, "score": score, "attention": None, "alignment": None,
                        "positional_scores": pos_scores})
            from_big = int(s.from_big[b, 1:n].sum())
            self.stats.big_tokens += from_big
            self.stats.small_tokens += tokens.numel() - from_big
            self.stats.tokens += tokens.numel()
        return out


class _BatchState:
    """Tokens, scores and progress of the unfinished sentences of a batch (``ids``: their
    positions in the batch as given), and the batch's counters, all on the device."""

    def __init__(self, bsz: int, width: int, device, bos: int, max_len: Tensor):
        self.ids = torch.arange(bsz, device=device)
        # width: room for max_len tokens, BOS, the forced EOS, and one scratch column that
        # clamped (padding) indices may write to
        self.tokens = torch.full((bsz, width), bos, dtype=torch.long, device=device)
        self.scores = torch.zeros(bsz, width, device=device)
        self.from_big = torch.zeros(bsz, width, dtype=torch.bool, device=device)
        self.n = torch.ones(bsz, dtype=torch.long, device=device)  # tokens so far, BOS included
        self.run = torch.zeros(bsz, dtype=torch.long, device=device)  # small tokens since last hand-over
        self.waiting = torch.zeros(bsz, dtype=torch.bool, device=device)  # handed over, frozen
        self.waited = torch.zeros(bsz, dtype=torch.long, device=device)  # loop iterations waited
        self.needs_big = torch.zeros(bsz, dtype=torch.bool, device=device)  # in this iteration's big pass
        self.finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.counters = torch.zeros(len(COUNTERS), dtype=torch.long, device=device)
        # per-sentence counts of EVENTS (one add per step, not a reduction), and the big passes
        self.events = torch.zeros(len(EVENTS), bsz, dtype=torch.long, device=device)
        self.big_calls = self.big_passes = 0

    @property
    def size(self) -> int:
        return self.ids.numel()

    def select(self, rows: Tensor) -> None:
        """Keep only sentences ``rows`` (in that order)."""
        self.fold_events()
        for name, value in vars(self).items():
            if isinstance(value, Tensor) and name not in ("counters", "events"):
                setattr(self, name, value.index_select(0, rows))
        self.events = self.events[:, :rows.numel()]

    def fold_events(self) -> None:
        """Add the per-sentence event counts and the big passes to the batch's counters (and zero them)."""
        self.counters.index_add_(0, _counter_index(EVENTS, self.counters.device), self.events.sum(1))
        self.events.zero_()
        self.counters[COUNTERS.index("big_calls")] += self.big_calls
        self.counters[COUNTERS.index("big_passes")] += self.big_passes
        self.big_calls = self.big_passes = 0

    def plan(self, big_length: Tensor, wait_share: float, max_wait: int, verify_drafting: bool) -> None:
        """This iteration's big pass (``needs_big``; none when the batch policy says it is not due):
        the waiting sentences, plus with ``verify_drafting`` the drafting ones that have small
        tokens the big model has not checked (its cache is one token behind, hence >= 2)."""
        if self.size == 1 or (wait_share == 0 and not verify_drafting):
            # one sentence, or the per-sentence policy: the rule below reduces to "who waits"
            self.needs_big = self.waiting.clone()
            return
        unfinished = ~self.finished
        chosen = self.waiting | (unfinished & (self.n - big_length >= 2)) if verify_drafting else self.waiting
        self.needs_big = chosen & big_pass_due(self.waiting, self.waited, unfinished, wait_share, max_wait)

    def read(self, big_length: Tensor) -> tuple[int, int, int, int]:
        """The loop's one host sync per iteration: sentences needing the big model, the most
        tokens one of them has not shown it, the longest sentence, finished sentences."""
        unseen = torch.where(self.needs_big, self.n - big_length, 0)
        values = torch.stack([self.needs_big.sum(), unseen.max(), self.n.max(), self.finished.sum()]).tolist()
        return tuple(values)


@functools.lru_cache(maxsize=None)
def _counter_index(names: tuple[str, ...], device) -> Tensor:
    return torch.tensor([COUNTERS.index(k) for k in names], device=device)
