"""The ONNX Runtime engine: the model's encoder, cross-attention projections and decoder as
three exported graphs (:mod:`bild_fairseq.engines.onnx_export`), one ``run`` per model call, on
the CPU.

The cache is the torch engine's :class:`DecoderCache`; its tensors are handed to ONNX Runtime
as numpy views (no copy), and the graph returns the new tokens' keys/values, which are written
into the cache here (numpy indexing: a few microseconds, where torch's index_put costs tens).
Exact mode needs a token's distribution to be the same bit for bit whether it is scored in a
one-token step or inside a k-token pass, whatever the other rows of the call. ONNX Runtime's
kernels give that with two measures (both measured on this project's hosts, tested in
``tests/test_engines.py``): its batched attention MatMul takes another code path for a single
query row (M = 1) than for two or more, so every call feeds at least two tokens per sentence;
and its 8-bit MatMulNBits kernel (accuracy_level 4) computes rows in pairs, an unpaired last row
rounding differently, so with 8-bit weights every call feeds an even number of token rows. The
extra tokens are scratch: they follow the real ones (the causal mask hides them), their
outputs are dropped and their cache slots lie past the sentence's length. For 8-bit sources
the encoder gets one more padding column where needed (its states, which the cross-attention
graph projects, then have an even number of rows too). Cost: a one-token step computes two
rows (measured in BENCHMARKS.md, "Engines").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bild_fairseq.engines.onnx_export import GRAPHS, graphs
from bild_fairseq.incremental import DecoderCache, EncoderOutput
from bild_fairseq.rules import Scores, SearchRules


class OrtEngine:
    name = "onnxruntime"

    def __init__(self, model: torch.nn.Module, int8: bool = False, cache_dir: str | Path | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        folder, self.export_seconds = graphs(model, int8, cache_dir)
        self.precision = "int8" if int8 else "fp32"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initializers are not the user's business
        session = lambda name: ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
        self.encoder, self.cross, self.decoder = (session(name) for name in GRAPHS)
        attn = model.decoder.layers[0].self_attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        self.eos = model.decoder.dictionary.eos()
        self.even_rows = int8  # see the module docstring (min. two tokens per row: always)
        self.pad = model.encoder.padding_idx
        self._rules: tuple[SearchRules, dict] | None = None

    def encode(self, src_tokens: Tensor, src_lengths: Tensor) -> EncoderOutput:
        if self.even_rows and src_tokens.numel() % 2:  # one more padding column (masked everywhere)
            src_tokens = torch.cat([src_tokens, src_tokens.new_full((src_tokens.size(0), 1), self.pad)], dim=1)
        states, mask = self.encoder.run(None, {"src_tokens": src_tokens.cpu().numpy()})
        return EncoderOutput(torch.from_numpy(states), torch.from_numpy(mask))

    def start(self, encoded: EncoderOutput, capacity: int = 32) -> DecoderCache:
        states = np.ascontiguousarray(encoded.states.cpu().numpy())
        cross_k, cross_v = self.cross.run(None, {"states": states})
        return DecoderCache.empty(torch.from_numpy(cross_k), torch.from_numpy(cross_v), encoded.source_mask.cpu(),
                                  self.heads, self.head_dim, capacity)

    def step(self, cache: DecoderCache, tokens: Tensor, visible: int, rules: SearchRules, max_len: Tensor) -> Scores:
        cache.reserve(visible + 1)  # the scratch token's slot (see the module docstring)
        length = cache.length.numpy()
        lprobs, best_lp, best, new_k, new_v = self._run(cache, tokens.unsqueeze(1), rules, max_len)
        batch = np.arange(length.size)
        # (L, B, H, 1, Dh) -> cache[:, b, :, length[b]]; advanced indices first: (B, L, H, Dh)
        cache.self_k.numpy()[:, batch, :, length] = new_k[:, :, :, 0].swapaxes(0, 1)
        cache.self_v.numpy()[:, batch, :, length] = new_v[:, :, :, 0].swapaxes(0, 1)
        cache.length += 1
        return Scores(*(torch.from_numpy(x[:, 0]) for x in (lprobs, best_lp, best)))

    def forward(self, cache: DecoderCache, rows: Tensor, tokens: Tensor, counts: Tensor, visible: int,
                all_rows: bool, rules: SearchRules, max_len: Tensor) -> Scores:
        k = tokens.size(1)
        cache.reserve(visible + k + 1)  # padding and scratch entries write (unused) slots up to start + k
        part = cache if all_rows else cache.rows(rows)
        start = part.length.numpy()
        lprobs, best_lp, best, new_k, new_v = self._run(part, tokens, rules, max_len)
        slots = start[:, None] + np.arange(k)  # (R, K)
        row_idx = np.broadcast_to(rows.numpy()[:, None], slots.shape)
        # (L, R, H, K, Dh) -> cache[:, r, :, slot]: advanced indices first, (R, K, L, H, Dh)
        cache.self_k.numpy()[:, row_idx, :, slots] = new_k.transpose(1, 3, 0, 2, 4)
        cache.self_v.numpy()[:, row_idx, :, slots] = new_v.transpose(1, 3, 0, 2, 4)
        cache.length[rows] = torch.from_numpy(start) + counts
        return Scores(*(torch.from_numpy(x) for x in (lprobs, best_lp, best)))

    def _run(self, cache: DecoderCache, tokens: Tensor, rules: SearchRules, max_len: Tensor) -> list[np.ndarray]:
        """The graph's outputs for ``tokens`` (R, K), scratch tokens added and dropped (see the
        module docstring)."""
        k = tokens.size(1)
        fed = max(k, 2)
        fed += self.even_rows and tokens.size(0) * fed % 2
        if fed > k:
            tokens = torch.cat([tokens, tokens[:, -1:].expand(-1, fed - k)], dim=1)
        outputs = self.decoder.run(None, {
            "tokens": np.ascontiguousarray(tokens.numpy()), "start": cache.length.numpy(), "self_k": cache.self_k.numpy(),
            "self_v": cache.self_v.numpy(), "cross_k": cache.cross_k.numpy(), "cross_v": cache.cross_v.numpy(),
            "source_mask": cache.source_mask.numpy(), **self._rule_inputs(rules), "max_len": max_len.numpy()})
        if outputs[0].shape[1] == k:
            return outputs
        lprobs, best_lp, best, new_k, new_v = outputs
        return [lprobs[:, :k], best_lp[:, :k], best[:, :k], new_k[:, :, :, :k], new_v[:, :, :, :k]]

    def _rule_inputs(self, rules: SearchRules) -> dict:
        """The rules' constant inputs, converted once per generator (its rules never change)."""
        if self._rules is None or self._rules[0] is not rules:
            if rules.eos != self.eos:
                raise ValueError(f"the search rules' EOS ({rules.eos}) is not the model dictionary's ({self.eos})")
            self._rules = (rules, {"bias": rules.bias.cpu().numpy(), "min_len": np.array(rules.min_len, np.int64)})
        return self._rules[1]
