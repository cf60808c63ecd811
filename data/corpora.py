"""The project's corpora and how each is prepared (one entry per task)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"


@dataclass(frozen=True)
class Corpus:
    name: str
    # fairseq's language suffixes (file names, dictionary names)
    src_suffix: str
    tgt_suffix: str
    # Moses tokenizer languages
    src_lang: str
    tgt_lang: str
    file_pattern: str  # formatted with split= and suffix=
    bpe_merges: int
    max_source_tokens: int | None = None
    max_len_b: int = 200  # decoding length cap (pair.json), in target BPE tokens

    def path(self, split: str, suffix: str) -> Path:
        return CORPORA_DIR / self.file_pattern.format(split=split, suffix=suffix)


CORPORA = {
    "deen": Corpus("deen", "de", "en", "de", "en", "lohelp.de-en.{split}.{suffix}.xz", 6000),
    # Debian long description -> synopsis; documents truncated to 80 Moses tokens (median is ~55);
    # synopses are short (train: median 10 BPE tokens, 99.9% <= 28, longest 51), so outputs are
    # capped at 64 tokens rather than letting an undertrained model repeat itself to 200
    "summ": Corpus("summ", "src", "tgt", "en", "en", "debdesc.{split}.{suffix}.xz", 6000, 80, 64),
}
SPLITS = ("train", "valid", "test")
