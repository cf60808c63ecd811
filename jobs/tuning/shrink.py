"""A student made of the teacher's own layers ("shrink and fine-tune", Shleifer & Rush 2020).

Tests whether a small model that starts from representations the big model already uses agrees
with it more often than a 1-layer 128-dim decoder trained on its own: the student is a subset of
the big model's layers (its embeddings, its output projection, all or some encoder layers, one or
two decoder layers), then fine-tuned on the big model's outputs. The encoder runs once per
sentence, so keeping all of it costs little; the decoder runs once per token, so the student keeps
few of its layers. Measured on de→en (benchmarks/distill-deen-sft.md): 68.5% agreement against
65.1%, but each small step dearer and BiLD slower.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from bild_fairseq.checkpoints import model_settings

_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$")


class ShrinkError(ValueError):
    """Layers that the teacher does not have; the message names them."""


def parse_layers(text: str) -> list[int]:
    """``"0,4"`` -> ``[0, 4]``; ``"0-3"`` -> ``[0, 1, 2, 3]``."""
    layers: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ShrinkError(f"{text!r} is not a list of layer numbers (e.g. 0 or 0,5 or 0-3)")
        layers += range(int(first), int(last or first) + 1)
    return layers


def shrink(teacher: Path, dst: Path, decoder_layers: Sequence[int], encoder_layers: Sequence[int] | None = None) -> Path:
    """Write a fairseq checkpoint of ``teacher``'s architecture with only the given layers (kept in
    order and renumbered; every weight outside the layers is kept: embeddings, output projection,
    layer norms), in fp32 for training. ``encoder_layers`` None keeps the whole encoder."""
    state = torch.load(teacher, map_location="cpu")  # weights-only, fairseq allow-list
    cfg = copy.deepcopy(state["cfg"])
    model_cfg = model_settings(cfg["model"])
    keep = {"decoder": list(decoder_layers),
            "encoder": list(range(model_cfg["encoder_layers"])) if encoder_layers is None else list(encoder_layers)}
    for side, layers in keep.items():
        have = model_cfg[f"{side}_layers"]
        if not layers or len(set(layers)) != len(layers) or not all(0 <= i < have for i in layers):
            raise ShrinkError(f"{teacher}: its {side} has layers 0-{have - 1}; asked to keep {layers}")
        model_cfg[f"{side}_layers"] = len(layers)
    model = {}
    for name, tensor in state["model"].items():
        match = _LAYER.match(name)
        if match is None:
            model[name] = tensor.float() if tensor.is_floating_point() else tensor
            continue
        side, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if index in keep[side]:
            model[f"{side}.layers.{keep[side].index(index)}.{rest}"] = tensor.float()
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "cfg": cfg, "model": model}, dst)
    return dst


#: fairseq transformer settings that apply to the encoder and the decoder alike: a grafted student
#: can only keep the teacher's encoder if the donor of its decoder has the same ones
_COMMON = ("activation_fn", "no_scale_embedding", "layernorm_embedding", "adaptive_input",
           "no_token_positional_embeddings", "max_source_positions")


def graft(teacher: Path, donor: Path, dst: Path, decoder_layers: int | None = None) -> Path:
    """Write a fairseq checkpoint of ``teacher``'s encoder and ``donor``'s decoder (its last layer
    repeated up to ``decoder_layers``; fewer keeps its first ones), in fp32 for training: the
    start of a student that shares the teacher's encoder (trained with the encoder frozen,
    ``transformer_frozen_encoder``). The donor's cross-attention must read encoder states as wide
    as the teacher's encoder writes (refused otherwise: its key/value projections would not fit)."""
    big, small = (torch.load(path, map_location="cpu") for path in (teacher, donor))  # weights-only, allow-list
    cfg = copy.deepcopy(small["cfg"])
    model_cfg, big_cfg = model_settings(cfg["model"]), model_settings(big["cfg"]["model"])
    differ = [key for key in _COMMON if model_cfg.get(key) != big_cfg.get(key)]
    width = (big_cfg["encoder_embed_dim"], model_cfg["encoder_embed_dim"])
    if differ or width[0] != width[1]:
        problem = (f"settings that apply to both encoder and decoder differ ({', '.join(differ)})" if differ
                   else f"its decoder reads {width[1]}-dim encoder states, the teacher's encoder writes {width[0]}")
        raise ShrinkError(f"{donor} cannot take {teacher}'s encoder: {problem}")
    model_cfg.update({key: value for key, value in big_cfg.items() if key.startswith("encoder_")})
    model_cfg["share_all_embeddings"] = False
    have = model_cfg["decoder_layers"]
    layers = decoder_layers or have
    model_cfg["decoder_layers"] = layers
    model = {name: tensor.float() for name, tensor in big["model"].items() if name.startswith("encoder.")}
    for name, tensor in small["model"].items():
        match = _LAYER.match(name)
        if name.startswith("decoder.") and match is None:
            model[name] = tensor.float() if tensor.is_floating_point() else tensor
        elif match is not None and match.group(1) == "decoder":
            index, rest = int(match.group(2)), match.group(3)
            targets = range(index, layers) if index == have - 1 else [index] if index < layers else []
            for target in targets:
                model[f"decoder.layers.{target}.{rest}"] = tensor.float().clone()
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**small, "cfg": cfg, "model": model}, dst)
    return dst


def adopt_encoder(student: Path, teacher: Path) -> Path:
    """Rewrite ``student``'s encoder weights as ``teacher`` stores them. A student trained on the
    teacher's frozen encoder holds the same values, but exporting in fp16 rounds an fp32
    teacher's; decoding recognises a shared encoder by bit-equal weights (bild_fairseq.sharing)."""
    state, big = (torch.load(path, map_location="cpu") for path in (student, teacher))  # weights-only, allow-list
    state["model"].update({name: tensor for name, tensor in big["model"].items() if name.startswith("encoder.")})
    torch.save(state, student)
    return student


@torch.no_grad()
def fit_cross_attention(student: Path, pair: Path, donor: str, lines: Sequence[str], ridge: float = 1e-3) -> float:
    """Re-express a grafted student's cross-attention for the teacher's encoder: the least-squares
    affine map from the teacher's encoder states to the donor's own (h_donor ~ h_teacher M + c,
    over the non-padding positions of ``lines``), folded into every decoder layer's key and value
    projections (W -> W M^T, b -> W c + b). The student then starts by reading the big encoder
    about as the donor read its own, instead of through projections fitted to another encoder.
    Returns the fit's R^2 (the share of the donor states' variance the map explains)."""
    from fairseq.data import data_utils

    from bild_fairseq.api import PairTranslator

    translators = [PairTranslator.from_pair_dir(pair, mode="big"),
                   PairTranslator.from_pair_dir(pair, mode="small", small_checkpoint=donor)]
    pipeline, pad = translators[0].spec.text_pipeline(), translators[0].task.source_dictionary.pad()
    ids = [translators[0].encode(line, pipeline)[0] for line in lines if line.strip()]
    states: list[list[Tensor]] = [[], []]
    for i in range(0, len(ids), 64):
        src = data_utils.collate_tokens(ids[i:i + 64], pad, left_pad=True)
        lengths, real = src.ne(pad).sum(1), src.ne(pad)
        for t, out in zip(translators, states):
            encoder = t.generator.model.single_model.encoder
            out.append(encoder(src, src_lengths=lengths)["encoder_out"][0].transpose(0, 1)[real])
    teacher, donor_states = (torch.cat(s).double() for s in states)
    x = torch.cat([teacher, torch.ones(len(teacher), 1, dtype=teacher.dtype)], dim=1)  # affine: last row is c
    gram = x.T @ x + ridge * len(x) * torch.eye(x.size(1), dtype=x.dtype)
    solution = torch.linalg.solve(gram, x.T @ donor_states)  # (E_teacher + 1, E_donor)
    residual = ((x @ solution - donor_states) ** 2).sum()
    r2 = float(1 - residual / ((donor_states - donor_states.mean(0)) ** 2).sum())
    m, c = solution[:-1], solution[-1]
    state = torch.load(student, map_location="cpu")  # weights-only, allow-list
    for name in [n for n in state["model"] if re.match(r"decoder\.layers\.\d+\.encoder_attn\.[kv]_proj\.weight$", n)]:
        weight = state["model"][name].double()
        bias_name = name[:-len("weight")] + "bias"
        state["model"][bias_name] = (weight @ c + state["model"][bias_name].double()).float()
        state["model"][name] = (weight @ m.T).float()
    torch.save(state, student)
    return r2
