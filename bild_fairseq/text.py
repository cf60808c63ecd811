"""Raw text <-> model tokens: Moses tokenization + joint BPE, and the inverse for outputs.

One class serves data preparation, the batch runner and the demo, so a pair decodes raw text
exactly as it was trained.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from sacremoses import MosesDetokenizer, MosesTokenizer
from subword_nmt.apply_bpe import BPE

BPE_SEPARATOR = "@@"
_BPE_JOIN = re.compile(r"@@( |$)")


@dataclass
class TextPipeline:
    """Tokenize+BPE a source line; remove BPE and detokenize a hypothesis.

    ``max_source_tokens`` truncates the Moses-tokenized source (the summarization pair is
    trained on truncated documents, so inference must truncate the same way).
    """

    source_lang: str
    target_lang: str
    bpe_codes: Path | None
    max_source_tokens: int | None = None

    @cached_property
    def _tok(self) -> MosesTokenizer:
        return MosesTokenizer(lang=self.source_lang)

    @cached_property
    def _tgt_tok(self) -> MosesTokenizer:
        return MosesTokenizer(lang=self.target_lang)

    @cached_property
    def _detok(self) -> MosesDetokenizer:
        return MosesDetokenizer(lang=self.target_lang)

    @cached_property
    def _bpe(self) -> BPE | None:
        if self.bpe_codes is None:
            return None
        with open(self.bpe_codes, encoding="utf-8") as f:
            return BPE(f, separator=BPE_SEPARATOR)

    def tokenize(self, line: str, target: bool = False) -> str:
        tok = self._tgt_tok if target else self._tok
        tokens = tok.tokenize(line.strip(), escape=False)
        if not target and self.max_source_tokens is not None:
            tokens = tokens[: self.max_source_tokens]
        return " ".join(tokens)

    def apply_bpe(self, tokenized: str) -> str:
        return self._bpe.process_line(tokenized) if self._bpe is not None else tokenized

    def encode(self, line: str, target: bool = False) -> str:
        """Raw line -> space-separated BPE units, as the models were trained on."""
        return self.apply_bpe(self.tokenize(line, target=target))

    def decode(self, bpe_line: str) -> str:
        """Model output (BPE units) -> detokenized raw text."""
        words = _BPE_JOIN.sub("", bpe_line.strip()).split()
        return self._detok.detokenize(words)
