"""BiLD as a fairseq SequenceGenerator: the small model proposes, the big model verifies.

Per batch (every sentence keeps its own state; the big model runs only on sentences that need it):

    encode the batch with both encoders
    while some sentence is unfinished:
        small model: catch up on its unseen tokens, propose the argmax of the next position
        fallback policy: confident and under max-small-steps -> keep the proposal
        big model, for sentences that fell back or proposed EOS: one pass over all its unseen
            tokens -> rollback policy on the small tokens since its last pass;
            rejected -> replace the first rejected token by the big argmax, cut the rest,
                        truncate both caches
            accepted -> a verified EOS ends the sentence, else append the big model's next token

With no small model the same loop is plain greedy decoding of one model (the project's own
big-only baseline). Deliberate deviations from the official BiLD code are listed in the README.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fairseq.sequence_generator import SequenceGenerator

from bild_fairseq.config import BildOptionError, check_thresholds
from bild_fairseq.incremental import DecoderCache, IncrementalDecoder
from bild_fairseq.policies import fallback, first_rollback
from bild_fairseq.stats import BildStats


def _ragged(tokens: Tensor, rows: Tensor, start: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """tokens[r, start[r]:end[r]] for each row, right-padded to a (R, K) tensor, and the counts."""
    counts = end - start
    k = int(counts.max())
    idx = (start.unsqueeze(1) + torch.arange(k, device=tokens.device)).clamp(max=tokens.size(1) - 1)
    return tokens[rows].gather(1, idx), counts


class BildSequenceGenerator(SequenceGenerator):
    """Greedy BiLD decoding of ``models[0]`` (big) with ``small_model``; SequenceGenerator's contract."""

    def __init__(self, models, tgt_dict, small_model=None, fallback_threshold: float = 0.6,
                 rollback_threshold: float = 5.0, max_small_steps: int = 10, exact: bool = False, **kwargs):
        if kwargs.get("beam_size", 1) != 1:
            raise BildOptionError(f"BiLD decodes greedily: use --beam 1 (got --beam {kwargs['beam_size']})")
        if len(models) != 1:
            raise BildOptionError(f"BiLD pairs one big model with one small model; got an ensemble of {len(models)}")
        if kwargs.get("no_repeat_ngram_size", 0) or kwargs.get("match_source_len", False):
            raise BildOptionError("BiLD does not support --no-repeat-ngram-size or --match-source-len")
        if kwargs.get("temperature", 1.0) != 1.0:
            raise BildOptionError("BiLD's policies are defined on the models' own distributions: use --temperature 1")
        check_thresholds(fallback_threshold, rollback_threshold, max_small_steps)
        super().__init__(models, tgt_dict, **kwargs)
        self.big = IncrementalDecoder(models[0].decoder)
        self.small_model = small_model
        self.small = IncrementalDecoder(small_model.decoder) if small_model is not None else None
        if small_model is not None:
            small_model.eval()
            self.max_len = min(self.max_len, small_model.max_decoder_positions())
            small_vocab = small_model.decoder.output_projection.out_features
            if small_vocab != len(tgt_dict):
                raise BildOptionError(
                    f"the small model's target dictionary has {small_vocab} entries but the big model's has "
                    f"{len(tgt_dict)}: BiLD needs both models trained on the same (joined) dictionary")
        self.fallback_threshold = fallback_threshold
        self.rollback_threshold = rollback_threshold
        self.max_small_steps = max_small_steps
        self.exact = exact
        self.stats = BildStats()

    # -- the search's constraints, applied identically to both models' distributions ----------

    def _constrain(self, lprobs: Tensor, step: Tensor, max_len: Tensor) -> Tensor:
        """fairseq's per-step rules: never pad, unk penalty, min length, EOS forced at max length.

        lprobs: (..., V); step and max_len broadcast against lprobs[..., 0].
        """
        lprobs = lprobs.masked_fill(lprobs != lprobs, -math.inf)
        lprobs[..., self.pad] = -math.inf
        lprobs[..., self.unk] -= self.unk_penalty
        if self.token_indices_to_suppress is not None:
            lprobs[..., self.token_indices_to_suppress.long()] = -math.inf
        eos_col = lprobs[..., self.eos].clone()
        at_max = (step >= max_len).unsqueeze(-1)
        lprobs = lprobs.masked_fill(at_max, -math.inf)
        lprobs[..., self.eos] = torch.where(step < self.min_len, -math.inf, eos_col)
        return lprobs

    # -- SequenceGenerator contract ---------------------------------------------------------

    @torch.no_grad()
    def _generate(self, sample, prefix_tokens=None, constraints=None, bos_token=None):
        if prefix_tokens is not None or constraints is not None:
            raise BildOptionError("BiLD does not support --prefix-size or --constraints")
        net_input = sample["net_input"]
        src_tokens = net_input["src_tokens"]
        bsz = src_tokens.size(0)
        src_lengths = (src_tokens.ne(self.eos) & src_tokens.ne(self.pad)).long().sum(dim=1)
        # per-sentence max length (fairseq uses the padded batch length, which makes a sentence's
        # output depend on its batch when max_len_a > 0)
        max_len = torch.clamp((self.max_len_a * src_lengths.float() + self.max_len_b).long(), max=self.max_len - 1)
        if self.min_len > int(max_len.min()):
            raise BildOptionError("min_len cannot be larger than max_len, please adjust these!")

        width = int(max_len.max()) + 2
        big_cache = self.big.start(self.model.single_model.encoder.forward_torchscript(net_input))
        small_cache = (self.small.start(self.small_model.encoder.forward_torchscript(net_input))
                       if self.small is not None else None)
        caches = [c for c in (big_cache, small_cache) if c is not None]
        state = _BatchState(bsz, width, src_tokens.device, self.eos if bos_token is None else bos_token, max_len)
        hypotheses: list[list[dict]] = [[] for _ in range(bsz)]
        while state.size > 0:
            if small_cache is not None:
                self._small_step(state, small_cache)
            self._big_step(state, big_cache, small_cache)
            if bool(state.finished.any()):  # finished sentences leave the batch and its caches
                done, keep = state.finished.nonzero().squeeze(1), (~state.finished).nonzero().squeeze(1)
                for sentence, hypo in zip(state.ids[done].tolist(), self._hypotheses(state, done)):
                    hypotheses[sentence] = [hypo]
                state.select(keep)
                for cache in caches:
                    cache.select(keep)
        self.stats.sentences += bsz
        return hypotheses

    def _small_step(self, s: "_BatchState", cache: DecoderCache) -> None:
        """Small model proposes one token for every unfinished sentence; marks hand-overs."""
        rows = torch.arange(s.size, device=s.n.device)  # every sentence in the batch is unfinished
        feed, counts = _ragged(s.tokens, rows, cache.length[rows], s.n[rows])
        lprobs = self.small.forward(cache, rows, feed, counts)
        last = lprobs[torch.arange(rows.numel(), device=rows.device), counts - 1]
        best_lp, best = self._constrain(last, s.n[rows] - 1, s.max_len[rows]).max(dim=-1)
        self.stats.small_steps += rows.numel()
        hand_over = fallback(best_lp, s.run[rows], self.fallback_threshold, self.max_small_steps)
        self.stats.fallbacks += int(hand_over.sum())
        s.needs_big[rows[hand_over]] = True
        keep, kept = rows[~hand_over], best[~hand_over]
        s.append(keep, kept, from_big=False)
        s.run[keep] += 1
        # a small-model EOS ends the sentence only once the big model has verified it
        s.needs_big[keep[kept == self.eos]] = True
        self.stats.eos_checks += int((kept == self.eos).sum())

    def _big_step(self, s: "_BatchState", cache: DecoderCache, small_cache: DecoderCache | None) -> None:
        """One parallel big-model pass over each needing sentence's unseen tokens, then rollback."""
        rows = (s.needs_big if small_cache is not None else ~s.finished).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        self.stats.big_calls += rows.numel()
        start, n = cache.length[rows], s.n[rows]
        feed, counts = _ragged(s.tokens, rows, start, n)
        entry = torch.arange(feed.size(1), device=feed.device).unsqueeze(0)
        positions = start.unsqueeze(1) + 1 + entry  # entry j predicts the token at start + 1 + j
        lprobs = self._constrain(self.big.forward(cache, rows, feed, counts), positions - 1, s.max_len[rows, None])
        # entries 0 .. counts-2 score the small model's tokens since the big model's last pass;
        # tokens the search forced (EOS at max length) are not the small model's choice
        proposals = s.tokens[rows].gather(1, positions.clamp(max=s.tokens.size(1) - 1))
        checkable = (entry < (counts - 1).unsqueeze(1)) & (positions - 1 < s.max_len[rows, None])
        cut = torch.minimum(first_rollback(lprobs, proposals, checkable, self.rollback_threshold, self.exact),
                            counts - 1)
        rolled = cut < counts - 1
        self.stats.rollbacks += int(rolled.sum())
        proposal_scores = lprobs.gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
        s.score(rows, positions, proposal_scores, entry < cut.unsqueeze(1))
        # the big model's own token goes at the cut: the rejected position, or the next one
        r = torch.arange(rows.numel(), device=rows.device)
        big_token = lprobs[r, cut].argmax(-1)
        big_score = lprobs[r, cut, big_token]
        verified_eos = ~rolled & (n > 1) & (s.tokens[rows, n - 1] == self.eos)
        grow = ~verified_eos
        s.n[rows[grow]] = (start + 1 + cut)[grow]
        s.append(rows[grow], big_token[grow], from_big=True, score=big_score[grow])
        s.finished[rows[verified_eos]] = True
        s.finished[rows[grow][big_token[grow] == self.eos]] = True
        # both caches keep only tokens before the newest one, which neither model has consumed
        cache.truncate(rows, s.n[rows] - 1)
        if small_cache is not None:
            small_cache.truncate(rows, s.n[rows] - 1)
        s.run[rows] = 0
        s.needs_big[rows] = False

    def _hypotheses(self, s: "_BatchState", rows: Tensor) -> list[dict]:
        """SequenceGenerator's hypothesis dicts for finished sentences ``rows``; counts their tokens."""
        out = []
        for b in rows.tolist():
            n = int(s.n[b])
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
    positions in the batch as given)."""

    def __init__(self, bsz: int, width: int, device, bos: int, max_len: Tensor):
        self.ids = torch.arange(bsz, device=device)
        self.tokens = torch.full((bsz, width), bos, dtype=torch.long, device=device)
        self.scores = torch.zeros(bsz, width, device=device)
        self.from_big = torch.zeros(bsz, width, dtype=torch.bool, device=device)
        self.n = torch.ones(bsz, dtype=torch.long, device=device)  # tokens so far, BOS included
        self.run = torch.zeros(bsz, dtype=torch.long, device=device)  # small tokens since last big pass
        self.needs_big = torch.zeros(bsz, dtype=torch.bool, device=device)
        self.finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        self.max_len = max_len

    @property
    def size(self) -> int:
        return self.ids.numel()

    def select(self, rows: Tensor) -> None:
        """Keep only sentences ``rows`` (in that order)."""
        for name, value in vars(self).items():
            setattr(self, name, value.index_select(0, rows))

    def append(self, rows: Tensor, tokens: Tensor, from_big: bool, score: Tensor | None = None) -> None:
        pos = self.n[rows]
        self.tokens[rows, pos] = tokens
        self.from_big[rows, pos] = from_big
        if score is not None:
            self.scores[rows, pos] = score
        self.n[rows] = pos + 1

    def score(self, rows: Tensor, positions: Tensor, scores: Tensor, valid: Tensor) -> None:
        r = rows.unsqueeze(1).expand_as(positions)[valid]
        self.scores[r, positions[valid]] = scores[valid]
