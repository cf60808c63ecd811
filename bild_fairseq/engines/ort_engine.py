"""The ONNX Runtime engine: the model's encoder and decoder as two exported graphs
(:mod:`bild_fairseq.engines.onnx_export`), one ``run`` per model call, on the CPU.

The cache is the torch engine's :class:`DecoderCache`; its tensors are handed to ONNX Runtime
as numpy views (no copy), and the graph returns the new tokens' keys/values, which are written
into the cache here. Rows are independent (each row's result is the same whatever its
batch-mates), in fp32 and with 8-bit weights alike.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from bild_fairseq.engines.onnx_export import graphs
from bild_fairseq.incremental import DecoderCache


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
        self.encoder, self.decoder = session("encoder.onnx"), session("decoder.onnx")
        attn = model.decoder.layers[0].self_attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim

    def start(self, src_tokens: Tensor, src_lengths: Tensor, capacity: int = 32) -> DecoderCache:
        cross_k, cross_v, mask = self.encoder.run(None, {"src_tokens": src_tokens.cpu().numpy()})
        return DecoderCache.empty(torch.from_numpy(cross_k), torch.from_numpy(cross_v), torch.from_numpy(mask),
                                  self.heads, self.head_dim, capacity)

    def step(self, cache: DecoderCache, tokens: Tensor, visible: int) -> Tensor:
        cache.reserve(visible)
        lprobs, new_k, new_v = self._run(cache, tokens.unsqueeze(1))
        batch = torch.arange(tokens.size(0))
        # (L, B, H, 1, Dh) -> cache[:, b, :, length[b]]; advanced indices first: (B, L, H, Dh)
        cache.self_k[:, batch, :, cache.length] = new_k[:, :, :, 0].transpose(0, 1)
        cache.self_v[:, batch, :, cache.length] = new_v[:, :, :, 0].transpose(0, 1)
        cache.length += 1
        return lprobs[:, 0]

    def forward(self, cache: DecoderCache, rows: Tensor, tokens: Tensor, counts: Tensor,
                visible: int, all_rows: bool) -> Tensor:
        k = tokens.size(1)
        cache.reserve(visible + k)  # padding entries write (unused) slots up to start + k - 1
        part = cache if all_rows else cache.rows(rows)
        start = part.length
        lprobs, new_k, new_v = self._run(part, tokens)
        slots = start.unsqueeze(1) + torch.arange(k)  # (R, K)
        row_idx = rows.unsqueeze(1).expand_as(slots)
        # (L, R, H, K, Dh) -> cache[:, r, :, slot]: advanced indices first, (R, K, L, H, Dh)
        cache.self_k[:, row_idx, :, slots] = new_k.permute(1, 3, 0, 2, 4)
        cache.self_v[:, row_idx, :, slots] = new_v.permute(1, 3, 0, 2, 4)
        cache.length[rows] = start + counts
        return lprobs

    def _run(self, cache: DecoderCache, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outputs = self.decoder.run(None, {
            "tokens": tokens.numpy(), "start": cache.length.numpy(), "self_k": cache.self_k.numpy(),
            "self_v": cache.self_v.numpy(), "cross_k": cache.cross_k.numpy(), "cross_v": cache.cross_v.numpy(),
            "source_mask": cache.source_mask.numpy()})
        return tuple(torch.from_numpy(x) for x in outputs)
