"""The checks `bild-jobs pair init` runs before it writes anything: that the two checkpoints load
with the given dictionaries and share the target one, that BiLD's decoder supports their
architectures, and that the declared tokenization matches the dictionaries and round-trips on
real lines (through the dictionary, as model output does; spacing aside). Each failure is one :class:`PairCheckError` naming the option and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bild_fairseq.checkpoints import CheckpointError, load_model
from bild_fairseq.incremental import IncrementalDecoder, UnsupportedDecoderError
from bild_fairseq.safe_load import UnsafeCheckpointError
from bild_fairseq.text import TextPipeline

#: the --text mini-language, one side
TEXT_HELP = "sentencepiece:MODEL, moses:LANG[+bpe:CODES] or none[+bpe:CODES]"
#: most units of a sample's encoding that may be unknown to the dictionary (a few rare
#: characters are; a mismatched tokenizer makes most words unknown)
MAX_UNKNOWN = 0.02
#: fewest sample lines that must come back with their characters from encoding and decoding
MIN_ROUND_TRIP = 0.9


class PairCheckError(ValueError):
    """One thing about the given models or files that does not fit; the message says what to do."""


def parse_text(value: str, option: str) -> dict:
    """One side's pipeline from ``--text``'s mini-language, in pair.json's form, with the
    user's files as absolute paths (pair init copies them and writes their names)."""
    if value.startswith("sentencepiece:"):
        return {"tokenizer": "sentencepiece", "model": _existing(value[len("sentencepiece:"):], option)}
    head, bpe, codes = value.partition("+bpe:")
    if head == "none":
        form = {"tokenizer": "none"}
    elif head.startswith("moses:") and head[len("moses:"):]:
        form = {"tokenizer": "moses", "lang": head[len("moses:"):]}
    else:
        raise PairCheckError(f"{option} {value!r}: expected {TEXT_HELP}")
    if bpe:
        form["bpe_codes"] = _existing(codes, option)
    return form


def _existing(path: str, option: str) -> str:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise PairCheckError(f"{option}: no such file {path}")
    return str(resolved)


def translation_task(dicts: Path, source_lang: str, target_lang: str):
    """fairseq's translation task over a directory holding dict.SRC.txt and dict.TGT.txt."""
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    for lang in (source_lang, target_lang):
        if not (dicts / f"dict.{lang}.txt").is_file():
            raise PairCheckError(f"--dicts {dicts}: no dict.{lang}.txt (give the fairseq-preprocess output directory "
                                 "the models were trained on, and --source-lang/--target-lang as its suffixes)")
    return TranslationTask.setup_task(TranslationConfig(data=str(dicts), source_lang=source_lang,
                                                        target_lang=target_lang))


def load_supported(path: Path, task, option: str) -> torch.nn.Module:
    """The checkpoint's model, refused when it does not fit the dictionaries or BiLD's decoder."""
    try:
        model = load_model(path, task)
    except (CheckpointError, UnsafeCheckpointError) as e:
        raise PairCheckError(f"{option}: {e}") from None
    decoder = getattr(model, "decoder", None)
    try:
        if decoder is None:
            raise UnsupportedDecoderError(f"{type(model).__name__} has no decoder: BiLD pairs encoder-decoder models")
        IncrementalDecoder(decoder)
    except UnsupportedDecoderError as e:
        raise PairCheckError(f"{option} {path}: {e}") from None
    return model


def same_dictionaries(dicts: Path, small_dicts: Path, langs: tuple[str, str]) -> None:
    """The small model's own dictionary files hold the big model's symbols, in order."""
    from fairseq.data import Dictionary

    for lang in langs:
        path = small_dicts / f"dict.{lang}.txt"
        if not path.is_file():
            raise PairCheckError(f"--small-dicts {small_dicts}: no dict.{lang}.txt")
        big, small = Dictionary.load(str(dicts / f"dict.{lang}.txt")).symbols, Dictionary.load(str(path)).symbols
        if big != small:
            at = next((i for i, (a, b) in enumerate(zip(big, small)) if a != b), min(len(big), len(small)))
            raise PairCheckError(
                f"--small-dicts: {path} differs from the big model's at entry {at} ({len(small)} vs {len(big)} "
                "entries): BiLD needs both models trained on the same dictionaries (fairseq-preprocess --srcdict/"
                "--tgtdict with the big model's dict.*.txt, then train or fine-tune the small model on that)")


@dataclass
class TextFigures:
    """How one side's pipeline fared on a sample."""

    lines: int
    units: int
    unknown: float  # share of encoded units not in the dictionary
    round_trip: float  # share of lines that come back with their characters (spacing aside)


def check_text(pipeline: TextPipeline, task, samples: dict[str, list[str]],
               options: dict[str, str]) -> dict[str, TextFigures]:
    """Encode each side's sample lines ("source", "target") into dictionary ids and decode them
    back, as a model's output is; ``options`` names the option that declared each side."""
    figures = {}
    for side, lines in samples.items():
        target, option = side == "target", options[side]
        dictionary = task.target_dictionary if target else task.source_dictionary
        ids = [dictionary.encode_line(pipeline.encode(line, target=target), add_if_not_exist=False, append_eos=False)
               for line in lines]
        units = sum(i.numel() for i in ids)
        unknown = sum(int(i.eq(dictionary.unk()).sum()) for i in ids) / max(units, 1)
        back = sum(_characters(pipeline.side(target).decode(dictionary.string(i))) == _characters(line)
                   for line, i in zip(lines, ids))
        f = figures[side] = TextFigures(len(lines), units, unknown, back / max(len(lines), 1))
        if f.unknown > MAX_UNKNOWN:
            raise PairCheckError(f"{option}: {f.unknown:.0%} of the {side} sample's {units} units are not in the "
                                 f"{side} dictionary: this is not the tokenization the models were trained with "
                                 "(another SentencePiece model, BPE codes or tokenizer?)")
        if f.round_trip < MIN_ROUND_TRIP:
            raise PairCheckError(f"{option}: only {f.round_trip:.0%} of {len(lines)} {side} sample lines come back "
                                 "with their characters from encoding, the dictionary and decoding (characters the "
                                 f"dictionary lacks, or a tokenizer that changes text?); at least {MIN_ROUND_TRIP:.0%} must")
    return figures


def _characters(text: str) -> str:
    """``text`` without whitespace: Moses detokenization restores words, not always their spacing
    ("1:1" comes back as "1: 1" on 13% of the de-en dev lines)."""
    return "".join(text.split())
