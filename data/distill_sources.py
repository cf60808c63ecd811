"""Source text for distilling a pair's small model: the corpus's training sources plus extra
text of the source language that shares nothing with the valid and test splits.

Sequence-level distillation needs only sources (the big model writes the targets), and the
summarization student fitted the 50,219 training descriptions' teacher outputs far better than
the valid ones' (training loss 2.39 vs validation 2.71): more sources, more of the teacher to
imitate. The DDTP corpus has both languages: Debian description paragraphs in English (for
summ; many from packages of its valid and test splits) and their German translations (for
deen). A line is dropped when any word 6-gram of it occurs in a valid or test source, when it is
a training source or a repeat, or when it is shorter than --min-words (summ: 15, so that
synopses and one-liners, which are not descriptions, stay out), so agreement on valid stays a
held-out measure.

    python data/distill_sources.py summ ../shared/corpora/ddtp.de-en.en.xz data/work/summ-distill.src.xz --min-words 15
    python data/distill_sources.py deen ../shared/corpora/ddtp.de-en.de.xz data/work/deen-distill.src.xz
"""
from __future__ import annotations

import argparse
import lzma
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.corpora import CORPORA  # noqa: E402
from jobs.shards import read_lines  # noqa: E402

NGRAM = 6


def ngrams(line: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = line.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def held_out_clean(extra: Iterable[str], train: Iterable[str], held_out: Iterable[str],
                   min_words: int = 1) -> list[str]:
    """The lines of ``extra`` with at least ``min_words`` words, no NGRAM-gram in common with
    ``held_out``, and neither a training line nor a repeat; in their original order."""
    held = set().union(*map(ngrams, held_out))
    seen = {line.strip() for line in train}
    kept = []
    for line in (raw.strip() for raw in extra):
        if len(line.split()) < min_words or line in seen or ngrams(line) & held:
            continue
        seen.add(line)
        kept.append(line)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("extra", type=Path, help="extra text in the source language, one segment per line (.xz)")
    parser.add_argument("out", type=Path, help="training sources + the kept extra lines (.xz)")
    parser.add_argument("--min-words", type=int, default=1, help="drop extra lines shorter than this")
    args = parser.parse_args()
    corpus = CORPORA[args.corpus]
    train = read_lines(corpus.path("train", corpus.src_suffix), None)
    held = [line for split in ("valid", "test") for line in read_lines(corpus.path(split, corpus.src_suffix), None)]
    extra = read_lines(args.extra, None)
    kept = held_out_clean(extra, train, held, args.min_words)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(args.out, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in [*train, *kept]))
    print(f"{args.out}: {len(train)} training sources + {len(kept)} of {len(extra)} extra lines "
          f"(the rest short, repeated or sharing a {NGRAM}-gram with valid/test)")


if __name__ == "__main__":
    main()
