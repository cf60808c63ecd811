"""Export a fairseq transformer as three ONNX graphs, and keep them in a cache keyed by its weights.

* ``encoder.onnx``: ``src_tokens`` (B, S) -> the encoder states (B, S, E) and the source mask (B, S);
* ``cross.onnx``: encoder states -> every decoder layer's cross-attention keys and values
  (L, B, H, S, Dh), apart from the encoder so that a small model sharing the big model's
  encoder projects the big model's states;
* ``decoder.onnx``: ``tokens`` (R, K) fed at slots ``start`` (R,) + 0..K-1, the cached
  self-attention keys/values (L, R, H, T, Dh), the cross-attention ones, the source mask and the
  search rules (``bias`` (V,), ``min_len`` (), ``max_len`` (R,); :func:`~bild_fairseq.rules.constrain`)
  -> constrained log-probabilities (R, K, V), their maximum and argmax (R, K), and the new
  tokens' keys/values (L, R, H, K, Dh). The rules and the argmax in the graph spare the decoding
  loop a dozen small tensor operations per call.

One decoder graph serves any k >= 1 and any rows: one ``run`` per model call. The graphs are
traced from :class:`IncrementalDecoder`'s own layer functions (same modules, same order of
operations), so the exporter supports exactly the decoders the torch engine supports. The new
keys are scattered into the past at their true slots before attending, and the past is masked
per row by ``start``: a key sits at the same index whatever k, T or the row's batch-mates, so
ONNX Runtime's row-independent kernels give a token the same distribution in a one-token step
and in a k-token pass (what exact mode relies on).

8-bit weights: every constant MatMul becomes ``MatMulNBits`` (bits 8, blocks of 128, symmetric)
with ``accuracy_level`` 4, which quantizes activations per row and block, so a row's result
still does not depend on its batch (torch's dynamic quantization uses one scale per call).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from bild_fairseq.incremental import EncoderOutput, IncrementalDecoder, additive_mask, cross_attention_kv
from bild_fairseq.rules import constrain
from bild_fairseq.sharing import structure

logger = logging.getLogger("bild_fairseq")

#: bump when the graphs' inputs, outputs or math change: older cached graphs are not reused
GRAPH_VERSION = 4
OPSET = 17
#: MatMulNBits settings (the kernel probe: block 128 with accuracy_level 4 is the fast,
#: row-independent choice on AVX2; accuracy_level 0 is 10x slower)
INT8 = {"bits": 8, "block_size": 128, "is_symmetric": True, "accuracy_level": 4}


class ExportError(RuntimeError):
    """The model could not be exported (one line: what and why)."""


def default_cache_dir() -> Path:
    """``$BILD_ONNX_CACHE``, else ``$XDG_CACHE_HOME/bild-fairseq/onnx`` (``~/.cache`` by default)."""
    if os.environ.get("BILD_ONNX_CACHE"):
        return Path(os.environ["BILD_ONNX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bild-fairseq" / "onnx"


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of what the graphs are made of: the weights, the module structure and the
    settings that are not weights (embedding scales, pre-/post-norm, padding index)."""
    h = hashlib.sha256(f"graph v{GRAPH_VERSION}|{model}".encode())
    for part in (model.encoder, model.decoder):
        h.update(structure(part).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


GRAPHS = ("encoder.onnx", "cross.onnx", "decoder.onnx")


class EncoderGraph(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, src_tokens: Tensor) -> tuple[Tensor, Tensor]:
        lengths = src_tokens.ne(self.encoder.padding_idx).long().sum(1)
        encoded = EncoderOutput.of(self.encoder(src_tokens, src_lengths=lengths))
        return encoded.states, encoded.source_mask


class CrossGraph(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, states: Tensor) -> tuple[Tensor, Tensor]:
        return cross_attention_kv(self.decoder, states)


class DecoderGraph(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder
        self.incremental = IncrementalDecoder(decoder)  # refuses what it does not support
        self.positions = decoder.max_positions()
        self.incremental._position_table(self.positions, next(decoder.parameters()))  # a constant of the graph

    def forward(self, tokens: Tensor, start: Tensor, self_k: Tensor, self_v: Tensor, cross_k: Tensor,
                cross_v: Tensor, source_mask: Tensor, bias: Tensor, min_len: Tensor,
                max_len: Tensor) -> tuple[Tensor, ...]:
        r, k = tokens.shape
        _, _, heads, capacity, head_dim = self_k.shape
        slots = start.unsqueeze(1) + torch.arange(k, device=tokens.device)  # (R, K)
        x = self.incremental._embed(tokens, slots, self.positions)
        # query j of row r sees slots <= start[r] + j: its cached past and the new tokens up to j;
        # masks made additive once here, not converted in every layer's attention
        self_mask = additive_mask((torch.arange(capacity, device=tokens.device).view(1, 1, capacity)
                                   <= slots.unsqueeze(-1)).unsqueeze(1), torch.float32)  # (R, 1, K, T)
        source_mask = additive_mask(source_mask[:, None, None, :], torch.float32)
        index = slots.view(r, 1, k, 1).expand(r, heads, k, head_dim)
        new_k, new_v = [], []
        for i, layer in enumerate(self.decoder.layers):
            def write(key: Tensor, value: Tensor, i: int = i) -> tuple[Tensor, Tensor]:
                new_k.append(key)
                new_v.append(value)
                return self_k[i].scatter(2, index, key), self_v[i].scatter(2, index, value)
            x = self.incremental._layer(layer, x, write, cross_k[i], cross_v[i], self_mask, source_mask)
        lprobs = constrain(self.incremental._output(x), bias, self.decoder.dictionary.eos(), min_len, slots,
                           max_len.unsqueeze(1))
        best_lp, best = lprobs.max(dim=-1)
        return lprobs, best_lp, best, torch.stack(new_k), torch.stack(new_v)


def graphs(model: torch.nn.Module, int8: bool, cache_dir: str | Path | None = None) -> tuple[Path, float | None]:
    """The directory holding ``model``'s graphs (:data:`GRAPHS`) at this precision, exported on
    first use; and the export's seconds (None when the cache had them)."""
    digest = model_digest(model)
    folder = Path(cache_dir or default_cache_dir()) / f"{digest[:24]}-{'int8' if int8 else 'fp32'}"
    if all((folder / name).is_file() for name in GRAPHS):
        return folder, None
    began = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        export(model, scratch, int8)
        try:
            scratch.rename(folder)
        except OSError:  # another process exported the same graphs meanwhile: keep theirs
            if not (folder / "decoder.onnx").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - began
    logger.info("exported %s to ONNX (%s) in %.1f s: %s", type(model).__name__, "int8" if int8 else "fp32",
                seconds, folder)
    return folder, seconds


def export(model: torch.nn.Module, out: Path, int8: bool) -> None:
    """Write ``out``/:data:`GRAPHS` for a float32 CPU model."""
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        raise ExportError(f"the ONNX Runtime engine exports float32 CPU models; this one is {param.dtype} on "
                          f"{param.device} (drop --fp16/--bf16, or use --bild-engine torch)")
    model.eval()  # (fairseq's make_generation_fast_ patches train(): eval() then returns None)
    pad = model.encoder.padding_idx
    src = torch.full((2, 7), 5, dtype=torch.long)
    src[0, :2] = pad
    layers, sa = len(model.decoder.layers), model.decoder.layers[0].self_attn
    with torch.no_grad():
        states, mask = EncoderGraph(model.encoder)(src)
        cross_k, cross_v = CrossGraph(model.decoder)(states)
        past = torch.zeros(layers, 2, sa.num_heads, 8, sa.head_dim)
        vocab = len(model.decoder.dictionary)
        dec_inputs = (torch.full((2, 3), 5, dtype=torch.long), torch.tensor([2, 4]), past, past.clone(),
                      cross_k, cross_v, mask, torch.zeros(vocab), torch.tensor(1), torch.tensor([200, 200]))
        _onnx(EncoderGraph(model.encoder), (src,), out / "encoder.onnx", ["src_tokens"], ["states", "source_mask"],
              {"src_tokens": {0: "batch", 1: "source"}, "states": {0: "batch", 1: "source"},
               "source_mask": {0: "batch", 1: "source"}})
        _onnx(CrossGraph(model.decoder), (states,), out / "cross.onnx", ["states"], ["cross_k", "cross_v"],
              {"states": {0: "batch", 1: "source"}, "cross_k": {1: "batch", 3: "source"},
               "cross_v": {1: "batch", 3: "source"}})
        _onnx(DecoderGraph(model.decoder), dec_inputs, out / "decoder.onnx",
              ["tokens", "start", "self_k", "self_v", "cross_k", "cross_v", "source_mask", "bias", "min_len",
               "max_len"],
              ["lprobs", "best_lp", "best", "new_k", "new_v"],
              {"tokens": {0: "rows", 1: "new"}, "start": {0: "rows"}, "self_k": {1: "rows", 3: "slots"},
               "self_v": {1: "rows", 3: "slots"}, "cross_k": {1: "rows", 3: "source"},
               "cross_v": {1: "rows", 3: "source"}, "source_mask": {0: "rows", 1: "source"},
               "max_len": {0: "rows"}, "lprobs": {0: "rows", 1: "new"}, "best_lp": {0: "rows", 1: "new"},
               "best": {0: "rows", 1: "new"}, "new_k": {1: "rows", 3: "new"}, "new_v": {1: "rows", 3: "new"}})
    if int8:
        for name in GRAPHS:
            quantize_weights(out / name)


def _onnx(module: torch.nn.Module, inputs: tuple, path: Path, input_names: list[str], output_names: list[str],
          dynamic_axes: dict) -> None:
    import warnings

    # eval() first: the exporter restores the wrapper's training flag afterwards, recursively, and
    # a fresh wrapper module is in training mode (it would leave the model with dropout on)
    module.eval()
    with warnings.catch_warnings():  # the TorchScript exporter warns that it is the legacy one
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)


def quantize_weights(path: Path) -> None:
    """Rewrite ``path`` with 8-bit MatMulNBits weights (see the module docstring)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, quiet.level = quiet.level, logging.WARNING  # it logs every node it looks at
    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), **INT8)
        quantizer.process()
    finally:
        quiet.setLevel(level)
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
