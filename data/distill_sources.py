"""Source text for distilling the summarization small model: the training descriptions plus the
DDTP corpus's English description paragraphs that share nothing with the valid and test splits.

Sequence-level distillation needs only sources (the big model writes the targets), and the
student fitted the 50,219 training descriptions' teacher outputs far better than the valid
ones' (training loss 2.39 vs validation 2.71). DDTP's English side holds Debian description
paragraphs, many from packages of the valid and test splits; a paragraph is dropped when any
word 6-gram of it occurs in a valid or test description (or when it is short: synopses and
one-liners; or a duplicate of a training description), so agreement on valid stays a held-out
measure.

    python data/distill_sources.py ../shared/corpora/ddtp.de-en.en.xz data/work/summ-distill.src.xz
"""
from __future__ import annotations

import argparse
import lzma
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.corpora import CORPORA  # noqa: E402
from data.prepare import read_lines  # noqa: E402

NGRAM = 6
MIN_WORDS = 15


def ngrams(line: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = line.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def held_out_clean(extra: Iterable[str], train: Iterable[str], held_out: Iterable[str]) -> list[str]:
    """The lines of ``extra`` with at least MIN_WORDS words, no NGRAM-gram in common with
    ``held_out``, and neither a training line nor a repeat; in their original order."""
    held = set().union(*map(ngrams, held_out))
    seen = {line.strip() for line in train}
    kept = []
    for line in (raw.strip() for raw in extra):
        if len(line.split()) < MIN_WORDS or line in seen or ngrams(line) & held:
            continue
        seen.add(line)
        kept.append(line)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extra", type=Path, help="extra English text, one paragraph per line (.xz)")
    parser.add_argument("out", type=Path, help="training descriptions + the kept extra lines (.xz)")
    args = parser.parse_args()
    corpus = CORPORA["summ"]
    train = read_lines(corpus.path("train", corpus.src_suffix), None)
    held = [line for split in ("valid", "test") for line in read_lines(corpus.path(split, corpus.src_suffix), None)]
    extra = read_lines(args.extra, None)
    kept = held_out_clean(extra, train, held)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(args.out, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in [*train, *kept]))
    print(f"{args.out}: {len(train)} training descriptions + {len(kept)} of {len(extra)} extra lines "
          f"(the rest short, repeated or sharing a {NGRAM}-gram with valid/test)")


if __name__ == "__main__":
    main()
