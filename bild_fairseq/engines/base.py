"""What the decoding loop needs from a runtime that runs one encoder-decoder model.

The BiLD loop (:mod:`bild_fairseq.generator`) drives two models through this interface and
never learns which runtime runs them, as the runner drives executors without knowing where the
workers run. An engine owns the model's encoder and a key/value cache of its decoder:

* ``start`` encodes a batch of sources and returns an empty :class:`DecoderCache`;
* ``step`` feeds exactly one new token per sentence (the common case: small-model proposals,
  big-only greedy) and returns the log-distributions of the next tokens;
* ``forward`` feeds a ragged set of rows ``k_r >= 1`` new tokens each in one pass (the big
  model's verification) and returns one log-distribution per new token;
* the cache itself truncates (rollback) and selects rows (finished sentences leave).

Both calls append the fed tokens to the cache. Results are float32 log-probabilities before
fairseq's search rules (the loop applies those). An engine is *row-independent* when a row's
result does not depend on which other rows share the call: ONNX Runtime's kernels are (measured),
torch's MKL ones are not (they pick kernels by row count).
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor

from bild_fairseq.incremental import DecoderCache


class Engine(Protocol):
    """One model on one runtime (see the module docstring)."""

    #: "torch" or "onnxruntime"; with ``precision`` what a run records
    name: str
    #: "fp32", "int8" (8-bit weights), or the torch model's dtype
    precision: str

    def start(self, src_tokens: Tensor, src_lengths: Tensor, capacity: int = 32) -> DecoderCache:
        """Encode left-padded sources (B, S); an empty cache with room for ``capacity`` tokens."""
        ...

    def step(self, cache: DecoderCache, tokens: Tensor, visible: int) -> Tensor:
        """Feed one token per sentence (``tokens``: (B,)); ``visible`` bounds ``length + 1``.
        Returns (B, V) log-probabilities of the token after each new one."""
        ...

    def forward(self, cache: DecoderCache, rows: Tensor, tokens: Tensor, counts: Tensor,
                visible: int, all_rows: bool) -> Tensor:
        """Feed ``counts[r]`` new tokens (``tokens``: (R, K), right-padded) to sentences ``rows``;
        ``visible`` bounds ``length + counts`` over them, ``all_rows``: ``rows`` is every
        sentence in order. Returns (R, K, V): entry j predicts the token after new token j."""
        ...
