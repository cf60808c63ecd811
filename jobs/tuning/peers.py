"""Peer engines in the benchmark: what a user would run instead of BiLD.

CTranslate2 (``pip install -e ".[peers]"``) decodes the pair's big model greedily after its own
``FairseqConverter`` has converted it; weights in the run's precision (``float32``, ``float16``,
``bfloat16``) or ``int8``. The peer is wrapped as a
fairseq-style generator (``generate(models, sample)``), so it gets the same collated batches and
the same timer as every other variant in ``jobs.tuning.measure``; token ids go in and come out, nothing
is re-tokenized. The converted model is cached by the checkpoint's checksum, so conversion is
paid once and never timed.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bild_fairseq.pairdir import PairSpec

#: CTranslate2's compute type for each of the project's precisions
CT2_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
COMPUTE_TYPES = (*CT2_TYPES.values(), "int8")


class PeerUnavailable(RuntimeError):
    """A peer engine is not installed or cannot convert this model (the message says why)."""


def ct2_missing() -> str | None:
    """Why the CTranslate2 rows cannot run here, or None when they can."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return 'CTranslate2 is not installed (pip install -e ".[peers]")'
    return None


def convert_ct2(spec: PairSpec, cache: Path | None = None) -> tuple[Path, float]:
    """The pair's big model converted with CTranslate2's own fairseq converter (cached by the
    checkpoint's sha256), and the seconds the conversion took (0 when cached)."""
    import bild_fairseq  # noqa: F401  (allow-lists argparse.Namespace for torch's weights-only load)
    from ctranslate2.converters import FairseqConverter

    from jobs.workdir import sha256_file

    model = spec.model_path(spec.big)
    out = (cache or Path(tempfile.gettempdir()) / "bild-ct2") / sha256_file(model)[:16]
    if (out / "model.bin").is_file():
        return out, 0.0
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    try:
        FairseqConverter(str(model), str(spec.directory), source_lang=spec.source_lang,
                         target_lang=spec.target_lang).convert(str(tmp), force=True)
    except Exception as e:  # the converter refuses e.g. different encoder/decoder head counts
        raise PeerUnavailable(f"CTranslate2 cannot convert {model}: {e}") from e
    tmp.rename(out)
    return out, time.perf_counter() - t0


def ct2_device(device: str) -> dict:
    """torch's device string as CTranslate2's arguments: "cuda:1" -> device="cuda", device_index=1."""
    kind, _, index = device.partition(":")
    return {"device": kind, "device_index": int(index or 0)}


class CT2Generator:
    """Greedy CTranslate2 decoding behind fairseq's ``generate(models, sample)`` contract."""

    def __init__(self, model_dir: Path, src_dict, tgt_dict, compute_type: str, max_len_b: int,
                 device: str = "cpu"):
        import ctranslate2

        if compute_type not in COMPUTE_TYPES:
            raise PeerUnavailable(f"compute type must be one of {COMPUTE_TYPES}, got {compute_type!r}")
        where = ct2_device(device)
        if compute_type not in (supported := ctranslate2.get_supported_compute_types(**where)):
            raise PeerUnavailable(f"CTranslate2 has no {compute_type} compute type on {device} here "
                                  f"(it has {', '.join(sorted(supported))})")
        self.translator = ctranslate2.Translator(str(model_dir), **where, compute_type=compute_type,
                                                 inter_threads=1, intra_threads=torch.get_num_threads())
        self.src_dict, self.tgt_dict, self.max_len_b = src_dict, tgt_dict, max_len_b
        self.model = self  # generate_batch passes generator.model.models back in
        self.models: list = []

    def generate(self, models, sample) -> list[list[dict]]:
        d = self.src_dict
        batch = [[d[i] for i in row.tolist() if i not in (d.pad(), d.eos())]
                 for row in sample["net_input"]["src_tokens"]]
        results = self.translator.translate_batch(batch, beam_size=1, max_decoding_length=self.max_len_b,
                                                  return_scores=False)
        eos = self.tgt_dict.eos()
        return [[{"tokens": torch.tensor([self.tgt_dict.index(t) for t in r.hypotheses[0]] + [eos])}]
                for r in results]
