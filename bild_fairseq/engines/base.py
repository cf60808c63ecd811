"""What the decoding loop needs from a runtime that runs one encoder-decoder model.

The BiLD loop (:mod:`bild_fairseq.generator`) drives two models through this interface and
never learns which runtime runs them, as the runner drives executors without knowing where the
workers run. An engine owns the model's encoder and a key/value cache of its decoder:

* ``encode`` runs the encoder over a batch of sources (:class:`EncoderOutput`);
* ``start`` projects an encoder output for the decoder and returns an empty
  :class:`DecoderCache`; the encoder output may come from another engine's ``encode``: a small
  model that shares the big model's encoder decodes from the big model's (its encoder never runs);
* ``step`` feeds exactly one new token per sentence (the common case: small-model proposals,
  big-only greedy) and returns the log-distributions of the next tokens;
* ``forward`` feeds a ragged set of rows ``k_r >= 1`` new tokens each in one pass (the big
  model's verification) and returns one log-distribution per new token;
* the cache itself truncates (rollback) and selects rows (finished sentences leave).

Both calls append the fed tokens to the cache and return :class:`~bild_fairseq.rules.Scores`:
float32 log-probabilities with fairseq's search rules applied (the loop passes its
:class:`~bild_fairseq.rules.SearchRules` and each row's length limit; a token's step is its slot,
the number of target tokens before the one it predicts) and their maximum, so an engine may fuse
the rules and the argmax into its own model call. An engine is *row-independent* when a row's
result does not depend on which other rows share the call: ONNX Runtime's kernels are (measured),
torch's MKL ones are not (they pick kernels by row count).
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor

from bild_fairseq.incremental import DecoderCache, EncoderOutput
from bild_fairseq.rules import Scores, SearchRules


class Engine(Protocol):
    """One model on one runtime (see the module docstring)."""

    #: "torch" or "onnxruntime"; with ``precision`` what a run records
    name: str
    #: "fp32", "int8" (8-bit weights), or the torch model's dtype
    precision: str

    def encode(self, src_tokens: Tensor, src_lengths: Tensor) -> EncoderOutput:
        """Encode left-padded sources (B, S)."""
        ...

    def start(self, encoded: EncoderOutput, capacity: int = 32) -> DecoderCache:
        """An empty cache for decoding ``encoded``, with room for ``capacity`` tokens."""
        ...

    def step(self, cache: DecoderCache, tokens: Tensor, visible: int, rules: SearchRules, max_len: Tensor) -> Scores:
        """Feed one token per sentence (``tokens``: (B,)); ``visible`` bounds ``length + 1``;
        ``max_len``: (B,). Scores of the token after each new one: (B, V), (B,), (B,)."""
        ...

    def forward(self, cache: DecoderCache, rows: Tensor, tokens: Tensor, counts: Tensor, visible: int,
                all_rows: bool, rules: SearchRules, max_len: Tensor) -> Scores:
        """Feed ``counts[r]`` new tokens (``tokens``: (R, K), right-padded) to sentences ``rows``;
        ``visible`` bounds ``length + counts`` over them, ``all_rows``: ``rows`` is every
        sentence in order; ``max_len``: (R,). Scores (R, K, V), (R, K), (R, K): entry j is of
        the token after new token j."""
        ...
