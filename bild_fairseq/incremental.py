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
* cross-attention keys/values are projected once per batch from the encoder output
  (:class:`EncoderOutput`, which a small model that shares the big model's encoder takes from
  the big model's engine);
* each call feeds a ragged set of rows with k_r new tokens each (padded to k), with a causal
  mask over the new tokens and full attention to each row's cached ones;
* masks are additive float tensors (0 or -inf, :func:`additive_mask`), built once per call:
  the same math as a boolean mask, in the form CUDA's fused (memory-efficient) attention kernel
  takes. ``is_causal`` does not fit: a row's queries start at its own cache length.

Supported: the ``transformer`` family (pre-/post-norm, learned or sinusoidal positions,
layernorm_embedding, scaled or unscaled embeddings, project in/out dims, tied or untied output).
Refused with :class:`UnsupportedDecoderError`: cross-self-attention, adaptive softmax,
NormFormer extras, attention bias_k/zero-attn, quant-noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class UnsupportedDecoderError(ValueError):
    """The decoder uses a feature the multi-token forward does not implement."""


@dataclass
class DecoderCache:
    """One decoder's state for a batch of sentences, the layers stacked in one tensor per kind
    (so an engine that runs the whole decoder as one graph passes each as one input)."""

    self_k: Tensor  # (L, B, H, T, Dh) keys/values of the target tokens, T slots (capacity)
    self_v: Tensor
    cross_k: Tensor  # (L, B, H, S, Dh) keys/values of the encoder output
    cross_v: Tensor
    source_mask: Tensor  # (B, S) True where the encoder output is real (not padding)
    length: Tensor  # (B,) tokens cached per sentence

    @classmethod
    def empty(cls, cross_k: Tensor, cross_v: Tensor, source_mask: Tensor, heads: int, head_dim: int,
              capacity: int) -> "DecoderCache":
        """A cache with no target token yet (``capacity`` slots per sentence to begin with)."""
        layers, b = cross_k.shape[:2]
        shape = (layers, b, heads, capacity, head_dim)
        return cls(cross_k.new_zeros(shape), cross_v.new_zeros(shape), cross_k, cross_v, source_mask,
                   torch.zeros(b, dtype=torch.long, device=cross_k.device))

    @property
    def capacity(self) -> int:
        return self.self_k.size(3)

    def truncate(self, rows: Tensor, keep: Tensor) -> None:
        """Forget cached tokens beyond ``keep`` for ``rows`` (rollback)."""
        self.length[rows] = torch.minimum(self.length[rows], keep)

    def reserve(self, slots: int) -> None:
        """Make room for ``slots`` tokens per sentence (at least doubling: amortized O(1) appends).
        Copies whole buffers rather than reading the longest length: no host sync."""
        if slots <= self.capacity:
            return
        old_capacity, size = self.capacity, max(slots, 2 * self.capacity)
        for name in ("self_k", "self_v"):
            old = getattr(self, name)
            layers, b, h, _, dh = old.shape
            new = old.new_zeros(layers, b, h, size, dh)
            new[:, :, :, :old_capacity] = old
            setattr(self, name, new)

    def select(self, rows: Tensor) -> None:
        """Keep only sentences ``rows`` (in that order): finished sentences leave the batch."""
        for name in ("self_k", "self_v", "cross_k", "cross_v"):
            setattr(self, name, getattr(self, name).index_select(1, rows))
        self.source_mask = self.source_mask.index_select(0, rows)
        self.length = self.length.index_select(0, rows)

    def rows(self, rows: Tensor) -> "DecoderCache":
        """A copy holding only sentences ``rows`` (their cached tokens, not a view)."""
        part = DecoderCache(self.self_k, self.self_v, self.cross_k, self.cross_v, self.source_mask, self.length)
        part.select(rows)
        return part


@dataclass
class EncoderOutput:
    """What a decoder reads of a batch's sources, whichever engine encoded them."""

    states: Tensor  # (B, S, E) the encoder's last layer
    source_mask: Tensor  # (B, S) True where the encoder output is real (not padding)

    @classmethod
    def of(cls, encoder_out: dict) -> "EncoderOutput":
        """From a fairseq encoder's output dict ((S, B, E) states, padding mask)."""
        enc = encoder_out["encoder_out"][0]
        s, b, _ = enc.shape
        pad = encoder_out["encoder_padding_mask"]
        source_mask = ~pad[0] if len(pad) > 0 else torch.ones(b, s, dtype=torch.bool, device=enc.device)
        return cls(enc.transpose(0, 1), source_mask)


def cross_attention_kv(decoder: torch.nn.Module, states: Tensor) -> tuple[Tensor, Tensor]:
    """Every decoder layer's cross-attention keys and values, projected once from the encoder
    states (B, S, E): (L, B, H, S, Dh) each."""
    keys, values = [], []
    for layer in decoder.layers:
        attn = layer.encoder_attn
        keys.append(_heads(attn.k_proj(states), attn.num_heads))
        values.append(_heads(attn.v_proj(states), attn.num_heads))
    return torch.stack(keys), torch.stack(values)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """``allowed`` (True: attend) as the additive mask SDPA adds to the scores: 0 where allowed,
    -inf elsewhere, in the queries' dtype (SDPA wants a float mask of the query's dtype)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(R, K, E) -> (R, H, K, Dh)"""
    r, k, e = x.shape
    return x.view(r, k, num_heads, e // num_heads).transpose(1, 2)


def _scale(attn) -> float:
    """SDPA's own default scale, spelled out: an exported graph then holds it as a constant
    instead of computing it from the query's shape on every call."""
    return 1.0 / math.sqrt(attn.head_dim)


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

    def start(self, encoded: EncoderOutput, capacity: int = 32) -> DecoderCache:
        """Project cross-attention keys/values once and allocate an empty self-attention cache
        (``capacity`` tokens per sentence to begin with; it grows as needed)."""
        cross_k, cross_v = cross_attention_kv(self.decoder, encoded.states)
        sa = self.decoder.layers[0].self_attn
        self._position_table(capacity, cross_k)
        return DecoderCache.empty(cross_k, cross_v, encoded.source_mask, sa.num_heads, sa.head_dim, capacity)

    def forward(self, cache: DecoderCache, rows: Tensor, tokens: Tensor, counts: Tensor,
                visible: int | None = None, all_rows: bool | None = None) -> Tensor:
        """Feed ``counts[r]`` new tokens (``tokens``: (R, K), right-padded) to sentences ``rows``.

        Returns float32 log-probabilities (R, K, V): entry j predicts the token after new token j.
        Appends the new tokens to the cache. ``visible`` (an upper bound on ``length + counts``
        over ``rows``) and ``all_rows`` (``rows`` is every sentence, in order) spare the host
        syncs that computing them costs; the decoding loop knows both already.
        """
        r, k = tokens.shape
        if all_rows is None:
            all_rows = r == cache.length.size(0) and bool((rows == torch.arange(r, device=rows.device)).all())
        start = cache.length.index_select(0, rows)  # (R,)
        slots = start.unsqueeze(1) + torch.arange(k, device=tokens.device)  # (R, K) slot == target position
        if visible is None:
            visible = int((start + counts).max())
        cache.reserve(visible + k)  # padding entries write (unused) slots up to start + k - 1
        x = self._embed(tokens, slots, cache.capacity)
        # query j of row r sees cached slots < start[r] + j + 1
        self_mask = additive_mask((torch.arange(visible, device=x.device).view(1, 1, visible)
                                   <= slots.unsqueeze(-1)).unsqueeze(1), x.dtype)  # (R, 1, K, visible)
        source_mask = additive_mask(_rows(cache.source_mask, rows, all_rows)[:, None, None, :], x.dtype)
        row_idx = rows.unsqueeze(1).expand(r, k)
        for i, layer in enumerate(self.decoder.layers):
            def write(key: Tensor, value: Tensor, i: int = i) -> tuple[Tensor, Tensor]:
                # cache[row, :, slot] = (H, Dh); then slice to the visible slots before gathering
                # rows: the gather copies, and the buffers hold up to twice the longest length
                cache.self_k[i][row_idx, :, slots] = key.transpose(1, 2)
                cache.self_v[i][row_idx, :, slots] = value.transpose(1, 2)
                return (_rows(cache.self_k[i][:, :, :visible], rows, all_rows),
                        _rows(cache.self_v[i][:, :, :visible], rows, all_rows))
            x = self._layer(layer, x, write, _rows(cache.cross_k[i], rows, all_rows),
                            _rows(cache.cross_v[i], rows, all_rows), self_mask, source_mask)
        cache.length[rows] = start + counts
        return self._output(x)

    def step(self, cache: DecoderCache, tokens: Tensor, visible: int) -> Tensor:
        """The common case of :meth:`forward`, specialised: every sentence of the batch feeds
        exactly one new token (``tokens``: (B,)). No ragged indices, no row gathers; the
        self-attention cache is read in place. ``visible``: an upper bound on ``length + 1``.

        Returns float32 log-probabilities (B, V) of the token after each new one.
        """
        b = tokens.size(0)
        slot = cache.length  # (B,) each sentence's new token goes to slot == its target position
        cache.reserve(visible)
        x = self._embed(tokens.unsqueeze(1), slot.unsqueeze(1), cache.capacity)
        self_mask = additive_mask((torch.arange(visible, device=x.device) <= slot.unsqueeze(1))[:, None, None, :],
                                  x.dtype)
        source_mask = additive_mask(cache.source_mask[:, None, None, :], x.dtype)
        batch = torch.arange(b, device=x.device)
        for i, layer in enumerate(self.decoder.layers):
            def write(key: Tensor, value: Tensor, i: int = i) -> tuple[Tensor, Tensor]:
                cache.self_k[i][batch, :, slot] = key[:, :, 0]
                cache.self_v[i][batch, :, slot] = value[:, :, 0]
                return cache.self_k[i][:, :, :visible], cache.self_v[i][:, :, :visible]
            x = self._layer(layer, x, write, cache.cross_k[i], cache.cross_v[i], self_mask, source_mask)
        cache.length += 1
        return self._output(x)[:, 0]

    def _embed(self, tokens: Tensor, slots: Tensor, capacity: int) -> Tensor:
        """Token + position embeddings of new tokens at cache slots ``slots`` (same shape)."""
        d = self.decoder
        x = d.embed_scale * d.embed_tokens(tokens)
        if d.project_in_dim is not None:
            x = d.project_in_dim(x)
        table = self._position_table(capacity, x)
        if table is not None:
            x = x + table[slots.clamp(max=table.size(0) - 1)]  # clamped: padding only
        if d.layernorm_embedding is not None:
            x = d.layernorm_embedding(x)
        return x

    def _output(self, x: Tensor) -> Tensor:
        d = self.decoder
        if d.layer_norm is not None:
            x = d.layer_norm(x)
        if d.project_out_dim is not None:
            x = d.project_out_dim(x)
        return F.log_softmax(d.output_layer(x).float(), dim=-1)

    @classmethod
    def _layer(cls, layer, x: Tensor, write_self_kv, cross_k: Tensor, cross_v: Tensor,
               self_mask: Tensor, source_mask: Tensor) -> Tensor:
        """One decoder layer; ``write_self_kv(k, v)`` caches the new keys/values and returns the
        keys/values to attend to."""
        x = cls._self_attention(layer, x, write_self_kv, self_mask)
        x = cls._cross_attention(layer, x, cross_k, cross_v, source_mask)
        return cls._feed_forward(layer, x)

    @staticmethod
    def _self_attention(layer, x: Tensor, write_self_kv, mask: Tensor) -> Tensor:
        attn = layer.self_attn
        residual = x
        if layer.normalize_before:
            x = layer.self_attn_layer_norm(x)
        q = _heads(attn.q_proj(x), attn.num_heads)
        keys, values = write_self_kv(_heads(attn.k_proj(x), attn.num_heads), _heads(attn.v_proj(x), attn.num_heads))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=_scale(attn))
        x = attn.out_proj(out.transpose(1, 2).flatten(2))
        x = layer.residual_connection(x, residual)
        return x if layer.normalize_before else layer.self_attn_layer_norm(x)

    @staticmethod
    def _cross_attention(layer, x: Tensor, keys: Tensor, values: Tensor, source_mask: Tensor) -> Tensor:
        attn = layer.encoder_attn
        residual = x
        if layer.normalize_before:
            x = layer.encoder_attn_layer_norm(x)
        q = _heads(attn.q_proj(x), attn.num_heads)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=source_mask, scale=_scale(attn))
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
