"""The pair directory: everything needed to decode raw text with a big/small model pair.

    big.pt  small.pt  [small-aligned.pt]  dict.<src>.txt  dict.<tgt>.txt  bpe.codes  pair.json

``pair.json`` (format 1)::

    {"format": 1, "task": "translation" | "summarization",
     "source_lang": "de", "target_lang": "en",        # fairseq suffixes (dictionary file names)
     "moses_source_lang": "de", "moses_target_lang": "en",
     "bpe": "subword_nmt", "bpe_codes": "bpe.codes",   # or "bpe": null for pre-split input
     # or instead of the four keys above, each side's pipeline (see TEXT_FORMS):
     "text": {"source": {"tokenizer": "sentencepiece", "model": "spm.model"},
              "target": {"tokenizer": "moses", "lang": "en", "bpe_codes": "bpe.codes"}},
     "max_source_tokens": null,                        # truncation of source words/pieces at training
     "big": "big.pt", "small": "small.pt",
     "shared_encoder": ["small-aligned.pt"],          # small models trained on the big encoder
     "bild": {"fallback_threshold": 0.6, "rollback_threshold": 5.0, "max_small_steps": 10,
              "wait_share": 0.5, "max_wait": 1000, "verify_drafting": false},  # absent: the --bild-* defaults
     "generation": {"max_len_a": 0, "max_len_b": 200},
     "run": {"mode": "big", "engine": "torch", "precision": "fp32",  # bild-jobs run's measured default
             "why": "...",                             # (batched work), with the figures
             "batch1": {"mode": ..., "engine": ..., "precision": ..., "why": ...}}}  # and at batch 1
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bild_fairseq.text import SentencePiece, Side, TextPipeline, Words

PAIR_FORMAT = 1
#: the per-side forms of pair.json's "text": tokenizer -> (required keys, optional keys)
TEXT_FORMS = {"moses": ({"lang"}, {"bpe_codes"}), "none": (set(), {"bpe_codes"}),
              "sentencepiece": ({"model"}, set())}
#: the shipped pairs' way to declare Moses + joint BPE on both sides, used when "text" is absent
LEGACY_TEXT_KEYS = ("moses_source_lang", "moses_target_lang", "bpe", "bpe_codes")
#: output length limits (a * source + b) where pair.json's "generation" leaves them out
GENERATION_DEFAULTS = {"max_len_a": 0, "max_len_b": 200}


class PairDirError(ValueError):
    """A pair directory is missing a file or has an invalid pair.json."""


@dataclass
class PairSpec:
    directory: Path
    task: str
    source_lang: str
    target_lang: str
    moses_source_lang: str | None = None
    moses_target_lang: str | None = None
    bpe: str | None = "subword_nmt"
    bpe_codes: str | None = "bpe.codes"
    text: dict = field(default_factory=dict)  # {"source": {...}, "target": {...}}; {}: the keys above
    max_source_tokens: int | None = None
    big: str = "big.pt"
    small: str = "small.pt"
    # small model files trained on the big model's encoder (bild-jobs distill --share-encoder): they
    # decode from its output (bild_fairseq.sharing recognises them by their weights; this
    # declaration makes a big model that no longer matches them a warning)
    shared_encoder: list = field(default_factory=list)
    bild: dict = field(default_factory=dict)
    generation: dict = field(default_factory=dict)
    # `bild-jobs run`'s defaults when no mode flag / --engine / --int8 is given, chosen by
    # measurement: {"mode": "bild" | "big", "engine": "torch" | "onnxruntime", "precision":
    # "fp32" | "int8", "why": "<the measured figures>", "batch1": {the same for one sentence at a
    # time, for interactive use}}; absent keys: BiLD, torch, fp32
    run: dict = field(default_factory=dict)
    format: int = PAIR_FORMAT

    @classmethod
    def load(cls, directory: str | Path) -> "PairSpec":
        directory = Path(directory)
        path = directory / "pair.json"
        if not path.is_file():
            raise PairDirError(f"{directory} is not a pair directory: {path} is missing (see README, 'Pair directories')")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PairDirError(f"{path} is not valid JSON: {e}") from e
        unknown = set(raw) - {f for f in cls.__dataclass_fields__ if f != "directory"}
        if unknown:
            raise PairDirError(f"{path}: unknown keys {sorted(unknown)}")
        if raw.get("format", PAIR_FORMAT) != PAIR_FORMAT:
            raise PairDirError(f"{path}: format {raw['format']} is not supported (expected {PAIR_FORMAT})")
        if raw.get("text") and any(raw.get(k) is not None for k in LEGACY_TEXT_KEYS):
            raise PairDirError(f"{path}: declare the text pipeline either in \"text\" or in "
                               f"{', '.join(LEGACY_TEXT_KEYS)}, not both")
        try:
            spec = cls(directory=directory, **raw)
        except TypeError as e:
            raise PairDirError(f"{path}: {e}") from e
        spec.check()
        return spec

    def save(self) -> Path:
        data = asdict(self)
        del data["directory"]
        for key in LEGACY_TEXT_KEYS if self.text else ("text",):
            del data[key]  # one declaration of the pipeline (the shipped pairs' files stay as they are)
        if not self.shared_encoder:
            del data["shared_encoder"]  # likewise: only pairs with such a small model list them
        path = self.directory / "pair.json"
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path

    def check(self, *models: str) -> None:
        """Fail early, naming the missing file, rather than deep inside fairseq."""
        needed = [f"dict.{self.source_lang}.txt", f"dict.{self.target_lang}.txt", *(models or (self.big,)),
                  *self.text_files()]
        for name in needed:
            if not (self.directory / name).is_file():
                raise PairDirError(f"pair directory {self.directory}: missing {name}")

    def model_path(self, which: str) -> Path:
        """``which`` is "big", "small", a file name in the directory (e.g. small-aligned.pt) or a path."""
        name = {"big": self.big, "small": self.small}.get(which, which)
        path = self.directory / name
        if not path.is_file():
            raise PairDirError(f"pair directory {self.directory}: missing model file {name}")
        return path

    def sides(self) -> dict[str, dict]:
        """Each side's declared pipeline in "text"'s form (the legacy keys translated)."""
        if not self.text:
            codes = {"bpe_codes": self.bpe_codes} if self.bpe is not None and self.bpe_codes else {}
            return {side: {"tokenizer": "moses", "lang": lang, **codes} if lang else {"tokenizer": "none", **codes}
                    for side, lang in (("source", self.moses_source_lang), ("target", self.moses_target_lang))}
        path = self.directory / "pair.json"
        for side in ("source", "target"):
            form = self.text.get(side) if isinstance(self.text, dict) else None
            if not isinstance(form, dict) or form.get("tokenizer") not in TEXT_FORMS:
                raise PairDirError(f"{path}: text.{side} must be an object with \"tokenizer\": one of "
                                   f"{', '.join(TEXT_FORMS)} (got {form!r})")
            required, optional = TEXT_FORMS[form["tokenizer"]]
            keys = set(form) - {"tokenizer"}
            if not required <= keys or not keys <= required | optional:
                raise PairDirError(f"{path}: text.{side} with tokenizer {form['tokenizer']} takes the keys "
                                   f"{sorted(required)} and optionally {sorted(optional)}, got {sorted(keys)}")
        return {side: self.text[side] for side in ("source", "target")}

    def text_files(self) -> list[str]:
        """The tokenization files (BPE codes, SentencePiece models) in the directory."""
        names = [form.get("bpe_codes") or form.get("model") for form in self.sides().values()]
        return list(dict.fromkeys(name for name in names if name))

    def text_pipeline(self) -> TextPipeline:
        sides = self.sides()
        return TextPipeline(self._side(sides["source"], self.max_source_tokens), self._side(sides["target"], None))

    def _side(self, form: dict, max_tokens: int | None) -> Side:
        if form["tokenizer"] == "sentencepiece":
            return SentencePiece(self.directory / form["model"], max_tokens)
        codes = form.get("bpe_codes")
        return Words(form.get("lang"), self.directory / codes if codes else None, max_tokens)
