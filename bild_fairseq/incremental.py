"""Multi-token incremental decoding over a fairseq ``TransformerDecoder``'s own modules.

fairseq's incremental mode consumes one token per call. BiLD's big model must score every
token it has not yet seen in ONE pass while reusing its cache for the prefix, and both models
must drop cached tokens on rollback. This module re-runs the decoder's layers (same weights,
same order of operations) over a cache we own:

* self-attention keys/values live per layer in (B, H, T, Dh) buffers with a per-sentence
  length, so appending k tokens writes k slots and truncating is setting a length — O(1); the
  buffers grow by doubling, so memory follows the longest output so far, not the length limit;
* finished sentences leave the batch (:meth:`DecoderCache.select`, like fairseq's cache
  reordering), so the common all-rows call attends over the cache in place, without a gather;
* cross-attention keys/values are projected once per batch from the encoder output;
* each call feeds a ragged set of rows with k_r new tokens each (padded to k), with a causal
  mask over the new tokens and full attention to each row's cached ones.

Supported: the ``transformer`` family (pre-/post-norm, learned or sinusoidal positions,
layernorm_embedding, scaled or unscaled embeddings, project in/out dims, tied or untied output).
Refused with :class:`UnsupportedDecoderError`: cross-self-attention, adaptive softmax,
NormFormer extras, attention bias_k/zero-attn, quant-noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class UnsupportedDecoderError(ValueError):
    """The decoder uses a feature the multi-token forward does not implement."""


@dataclass
class DecoderCache:
    """One decoder's state for a batch of sentences."""

    self_k: list[Tensor]  # per layer (B, H, T, Dh)
    self_v: list[Tensor]
    cross_k: list[Tensor]  # per layer (B, H, S, Dh)
    cross_v: list[Tensor]
    source_mask: Tensor  # (B, S) True where the encoder output is real (not padding)
    length: Tensor  # (B,) tokens cached per sentence

    @property
    def capacity(self) -> int:
        return self.self_k[0].size(2)

    def truncate(self, rows: Tensor, keep: Tensor) -> None:
        """Forget cached tokens beyond ``keep`` for ``rows`` (rollback)."""
        self.length[rows] = torch.minimum(self.length[rows], keep)

    def reserve(self, slots: int) -> None:
        """Make room for ``slots`` tokens per sentence (at least doubling: amortized O(1) appends)."""
        if slots <= self.capacity:
            return
        used, size = int(self.length.max()), max(slots, 2 * self.capacity)
        for buffers in (self.self_k, self.self_v):
            for i, old in enumerate(buffers):
                b, h, _, dh = old.shape
                buffers[i] = old.new_zeros(b, h, size, dh)
                buffers[i][:, :, :used] = old[:, :, :used]

    def select(self, rows: Tensor) -> None:
        """Keep only sentences ``rows`` (in that order): finished sentences leave the batch."""
        for buffers in (self.self_k, self.self_v, self.cross_k, self.cross_v):
            buffers[:] = [t.index_select(0, rows) for t in buffers]
        self.source_mask = self.source_mask.index_select(0, rows)
        self.length = self.length.index_select(0, rows)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(R, K, E) -> (R, H, K, Dh)"""
    r, k, e = x.shape
    return x.view(r, k, num_heads, e // num_heads).transpose(1, 2)


def _rows(t: Tensor, rows: Tensor, all_rows: bool) -> Tensor:
    return t if all_rows else t.index_select(0, rows)


class IncrementalDecoder:
    """Wraps a fairseq TransformerDecoder for cached multi-token forward passes."""

    def __init__(self, decoder: torch.nn.Module):
        self.decoder = decoder
        self._check_supported()
        self._positions: Tensor | None = None

    def _check_supported(self) -> None:
        from fairseq.models.transformer import TransformerDecoderBase

        d = self.decoder
        name = type(d).__name__
        if not isinstance(d, TransformerDecoderBase):
            raise UnsupportedDecoderError(f"BiLD needs a fairseq TransformerDecoder (transformer family), got {name}")
        problems = []
        if d.cross_self_attention:
            problems.append("cross_self_attention")
        if d.adaptive_softmax is not None:
            problems.append("adaptive softmax")
        if d.quant_noise is not None:
            problems.append("quant_noise")
        for layer in d.layers:
            if layer.encoder_attn is None:
                problems.append("decoder without encoder attention")
            for attn in (layer.self_attn, layer.encoder_attn):
                if attn is not None and (attn.bias_k is not None or attn.add_zero_attn):
                    problems.append("attention bias_k/add_zero_attn")
            if any(getattr(layer, a, None) is not None for a in ("c_attn", "attn_ln", "ffn_layernorm", "w_resid")):
                problems.append("NormFormer scaling (scale_heads/scale_attn/scale_fc/scale_resids)")
        if problems:
            raise UnsupportedDecoderError(f"{name}: BiLD's multi-token decoder does not support " + ", ".join(sorted(set(problems))))

    def _position_table(self, length: int, like: Tensor) -> Tensor | None:
        """Positional embeddings for positions 0..length-1 of an unpadded target prefix."""
        embed = self.decoder.embed_positions
        if embed is None:
            return None
        length = min(length, embed.max_positions)
        if self._positions is None or self._positions.size(0) < length or self._positions.device != like.device:
            # fairseq numbers target positions padding_idx+1, padding_idx+2, ...: ask the module itself
            fake = torch.full((1, length), self.decoder.padding_idx + 1, dtype=torch.long, device=like.device)
            self._positions = embed(fake)[0].detach()
        return self._positions

    def start(self, encoder_out: dict, capacity: int = 32) -> DecoderCache:
        """Project cross-attention keys/values once and allocate an empty self-attention cache
        (``capacity`` tokens per sentence to begin with; it grows as needed)."""
        enc = encoder_out["encoder_out"][0]  # (S, B, E_enc)
        s, b, _ = enc.shape
        pad = encoder_out["encoder_padding_mask"]
        source_mask = ~pad[0] if len(pad) > 0 else torch.ones(b, s, dtype=torch.bool, device=enc.device)
        enc = enc.transpose(0, 1)
        cross_k, cross_v, self_k, self_v = [], [], [], []
        for layer in self.decoder.layers:
            attn = layer.encoder_attn
            cross_k.append(_heads(attn.k_proj(enc), attn.num_heads).contiguous())
            cross_v.append(_heads(attn.v_proj(enc), attn.num_heads).contiguous())
            sa = layer.self_attn
            shape = (b, sa.num_heads, capacity, sa.head_dim)
            self_k.append(enc.new_zeros(shape))
            self_v.append(enc.new_zeros(shape))
        self._position_table(capacity, enc)
        return DecoderCache(self_k, self_v, cross_k, cross_v, source_mask,
                            torch.zeros(b, dtype=torch.long, device=enc.device))

    def forward(self, cache: DecoderCache, rows: Tensor, tokens: Tensor, counts: Tensor) -> Tensor:
        """Feed ``counts[r]`` new tokens (``tokens``: (R, K), right-padded) to sentences ``rows``.

        Returns float32 log-probabilities (R, K, V): entry j predicts the token after new token j.
        Appends the new tokens to the cache.
        """
        d = self.decoder
        r, k = tokens.shape
        all_rows = r == cache.length.size(0) and bool((rows == torch.arange(r, device=rows.device)).all())
        start = cache.length.index_select(0, rows)  # (R,)
        offsets = torch.arange(k, device=tokens.device)
        slots = start.unsqueeze(1) + offsets  # (R, K) cache slot == target position of each new token
        visible = int((start + counts).max())
        cache.reserve(int(slots.max()) + 1)  # padding entries write (unused) slots too

        x = d.embed_scale * d.embed_tokens(tokens)
        if d.project_in_dim is not None:
            x = d.project_in_dim(x)
        table = self._position_table(cache.capacity, x)
        if table is not None:
            x = x + table[slots.clamp(max=table.size(0) - 1)]  # clamped: padding only
        if d.layernorm_embedding is not None:
            x = d.layernorm_embedding(x)

        # query j of row r sees cached slots < start[r] + j + 1
        self_mask = (torch.arange(visible, device=x.device).view(1, 1, visible)
                     <= slots.unsqueeze(-1)).unsqueeze(1)  # (R, 1, K, visible)
        source_mask = _rows(cache.source_mask, rows, all_rows)[:, None, None, :]
        row_idx = rows.unsqueeze(1).expand(r, k)
        for i, layer in enumerate(d.layers):
            x = self._self_attention(layer, x, cache, i, rows, all_rows, row_idx, slots, visible, self_mask)
            x = self._cross_attention(layer, x, cache, i, rows, all_rows, source_mask)
            x = self._feed_forward(layer, x)
        if d.layer_norm is not None:
            x = d.layer_norm(x)
        if d.project_out_dim is not None:
            x = d.project_out_dim(x)
        cache.length[rows] = start + counts
        return F.log_softmax(d.output_layer(x).float(), dim=-1)

    @staticmethod
    def _self_attention(layer, x, cache, i, rows, all_rows, row_idx, slots, visible, mask) -> Tensor:
        attn = layer.self_attn
        residual = x
        if layer.normalize_before:
            x = layer.self_attn_layer_norm(x)
        q = _heads(attn.q_proj(x), attn.num_heads)
        # write the new keys/values into their slots: cache[row, :, slot] = (H, Dh)
        cache.self_k[i][row_idx, :, slots] = _heads(attn.k_proj(x), attn.num_heads).transpose(1, 2)
        cache.self_v[i][row_idx, :, slots] = _heads(attn.v_proj(x), attn.num_heads).transpose(1, 2)
        # slice to the visible slots before gathering rows: the gather copies, and the buffers
        # hold up to twice the longest cached length (plus rows' unused tails)
        keys = _rows(cache.self_k[i][:, :, :visible], rows, all_rows)
        values = _rows(cache.self_v[i][:, :, :visible], rows, all_rows)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = attn.out_proj(out.transpose(1, 2).flatten(2))
        x = layer.residual_connection(x, residual)
        return x if layer.normalize_before else layer.self_attn_layer_norm(x)

    @staticmethod
    def _cross_attention(layer, x, cache, i, rows, all_rows, source_mask) -> Tensor:
        attn = layer.encoder_attn
        residual = x
        if layer.normalize_before:
            x = layer.encoder_attn_layer_norm(x)
        q = _heads(attn.q_proj(x), attn.num_heads)
        out = F.scaled_dot_product_attention(
            q, _rows(cache.cross_k[i], rows, all_rows), _rows(cache.cross_v[i], rows, all_rows), attn_mask=source_mask
        )
        x = attn.out_proj(out.transpose(1, 2).flatten(2))
        x = layer.residual_connection(x, residual)
        return x if layer.normalize_before else layer.encoder_attn_layer_norm(x)

    @staticmethod
    def _feed_forward(layer, x) -> Tensor:
        residual = x
        if layer.normalize_before:
            x = layer.final_layer_norm(x)
        x = layer.fc2(layer.activation_fn(layer.fc1(x)))
        x = layer.residual_connection(x, residual)
        return x if layer.normalize_before else layer.final_layer_norm(x)
