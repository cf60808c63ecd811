"""The reference engine: the checkpoint's own torch modules, run by :class:`IncrementalDecoder`."""
from __future__ import annotations

import torch
from torch import Tensor

from bild_fairseq.incremental import DecoderCache, EncoderOutput, IncrementalDecoder
from bild_fairseq.precision import precision_of
from bild_fairseq.rules import Scores, SearchRules


class TorchEngine:
    """Runs a fairseq transformer with torch, on whatever device and dtype the model has."""

    name = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.decoder = IncrementalDecoder(model.decoder)
        self.precision = precision_of(model)

    def encode(self, src_tokens: Tensor, src_lengths: Tensor) -> EncoderOutput:
        return EncoderOutput.of(self.model.encoder.forward_torchscript({"src_tokens": src_tokens,
                                                                         "src_lengths": src_lengths}))

    def start(self, encoded: EncoderOutput, capacity: int = 32) -> DecoderCache:
        return self.decoder.start(encoded, capacity)

    def step(self, cache: DecoderCache, tokens: Tensor, visible: int, rules: SearchRules, max_len: Tensor) -> Scores:
        step = cache.length.clone()
        return rules.scores(self.decoder.step(cache, tokens, visible), step, max_len)

    def forward(self, cache: DecoderCache, rows: Tensor, tokens: Tensor, counts: Tensor, visible: int,
                all_rows: bool, rules: SearchRules, max_len: Tensor) -> Scores:
        step = cache.length[rows].unsqueeze(1) + torch.arange(tokens.size(1), device=tokens.device)
        lprobs = self.decoder.forward(cache, rows, tokens, counts, visible=visible, all_rows=all_rows)
        return rules.scores(lprobs, step, max_len.unsqueeze(1))
