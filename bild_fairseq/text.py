"""Raw text <-> model tokens, per side, and the inverse for outputs.

A pair's models were trained on units made one of three ways, declared per side in pair.json:
words split by Moses (or given pre-split, ``none``), optionally cut by subword-nmt BPE; or
SentencePiece pieces. One class serves data preparation, the batch runner, binarizing and the
demo, so a pair decodes raw text exactly as it was trained, and detokenizes the way its target
side was tokenized.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

BPE_SEPARATOR = "@@"
_BPE_JOIN = re.compile(r"@@( |$)")


class Side(Protocol):
    """One side's text pipeline: raw line <-> space-separated model units."""

    def encode(self, line: str) -> str:
        ...

    def decode(self, units: str) -> str:
        ...


@dataclass
class Words:
    """Moses tokenization (``lang``) or pre-split input (``lang`` None), then optional joint
    subword-nmt BPE. ``max_tokens`` truncates the words before BPE (the summarization pair is
    trained on truncated documents, so inference must truncate the same way)."""

    lang: str | None
    bpe_codes: Path | None = None
    max_tokens: int | None = None

    @cached_property
    def _tok(self):
        from sacremoses import MosesTokenizer

        return MosesTokenizer(lang=self.lang)

    @cached_property
    def _detok(self):
        from sacremoses import MosesDetokenizer

        return MosesDetokenizer(lang=self.lang)

    @cached_property
    def _bpe(self):
        from subword_nmt.apply_bpe import BPE

        with open(self.bpe_codes, encoding="utf-8") as f:
            return BPE(f, separator=BPE_SEPARATOR)

    def tokenize(self, line: str) -> str:
        tokens = self._tok.tokenize(line.strip(), escape=False) if self.lang else line.split()
        return " ".join(tokens[: self.max_tokens] if self.max_tokens is not None else tokens)

    def apply_bpe(self, tokenized: str) -> str:
        return self._bpe.process_line(tokenized) if self.bpe_codes is not None else tokenized

    def encode(self, line: str) -> str:
        return self.apply_bpe(self.tokenize(line))

    def decode(self, units: str) -> str:
        words = _BPE_JOIN.sub("", units.strip()).split()
        return self._detok.detokenize(words) if self.lang else " ".join(words)


@dataclass
class SentencePiece:
    """SentencePiece pieces (fairseq's WMT and NLLB recipes); ``max_tokens`` truncates the pieces."""

    model: Path
    max_tokens: int | None = None

    @cached_property
    def _sp(self):
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(self.model))

    def encode(self, line: str) -> str:
        pieces = self._sp.encode(line.strip(), out_type=str)
        return " ".join(pieces[: self.max_tokens] if self.max_tokens is not None else pieces)

    def decode(self, units: str) -> str:
        return self._sp.decode_pieces(units.split())


@dataclass
class TextPipeline:
    """Encode a source (or reference) line; decode a hypothesis with the target side."""

    source: Side
    target: Side

    @classmethod
    def moses(cls, source_lang: str, target_lang: str, bpe_codes: Path | None,
              max_source_tokens: int | None = None) -> "TextPipeline":
        """Moses on both sides with one joint BPE (the shipped pairs' pipeline)."""
        return cls(Words(source_lang, bpe_codes, max_source_tokens), Words(target_lang, bpe_codes))

    def side(self, target: bool) -> Side:
        return self.target if target else self.source

    def encode(self, line: str, target: bool = False) -> str:
        """Raw line -> space-separated units, as the models were trained on."""
        return self.side(target).encode(line)

    def decode(self, units: str) -> str:
        """Model output (target units) -> detokenized raw text."""
        return self.target.decode(units)
