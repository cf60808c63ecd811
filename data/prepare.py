"""Prepare a corpus for fairseq: Moses tokenization, joint BPE, fairseq-preprocess --joined-dictionary.

    python data/prepare.py deen            # -> data/work/deen/{tok,bpe,bin}
    python data/prepare.py summ --limit 2000 --out /tmp/x   # a slice, for tests

The joined dictionary is what lets a big and a small model decode together.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bild_fairseq.text import TextPipeline  # noqa: E402
from data.corpora import CORPORA, SPLITS, Corpus  # noqa: E402
from jobs.shards import read_lines  # noqa: E402  (plain, gzip or xz)


def prepare(corpus: Corpus, out: Path, limit: int | None = None, workers: int = 2) -> Path:
    """Write tokenized, BPE'd and binarized data under ``out``; returns the data-bin directory."""
    from subword_nmt.learn_bpe import learn_bpe

    tok_dir, bpe_dir, bin_dir = out / "tok", out / "bpe", out / "bin"
    for d in (tok_dir, bpe_dir):
        d.mkdir(parents=True, exist_ok=True)
    plain = TextPipeline.moses(corpus.src_lang, corpus.tgt_lang, None, corpus.max_source_tokens)
    for split in SPLITS:
        for suffix, target in ((corpus.src_suffix, False), (corpus.tgt_suffix, True)):
            lines = read_lines(corpus.path(split, suffix), limit)
            (tok_dir / f"{split}.{suffix}").write_text(
                "\n".join(plain.side(target).tokenize(line) for line in lines) + "\n", encoding="utf-8"
            )
    codes = out / "bpe.codes"
    joint = out / "tok" / "train.joint"
    joint.write_text(
        (tok_dir / f"train.{corpus.src_suffix}").read_text(encoding="utf-8")
        + (tok_dir / f"train.{corpus.tgt_suffix}").read_text(encoding="utf-8"),
        encoding="utf-8",
    )
    with open(joint, encoding="utf-8") as fin, open(codes, "w", encoding="utf-8") as fout:
        learn_bpe(fin, fout, corpus.bpe_merges)
    joint.unlink()
    bpe = TextPipeline.moses(corpus.src_lang, corpus.tgt_lang, codes)
    for split in SPLITS:
        for suffix in (corpus.src_suffix, corpus.tgt_suffix):
            lines = (tok_dir / f"{split}.{suffix}").read_text(encoding="utf-8").splitlines()
            (bpe_dir / f"{split}.{suffix}").write_text(
                "\n".join(bpe.source.apply_bpe(line) for line in lines) + "\n", encoding="utf-8"
            )
    subprocess.run(
        [
            "fairseq-preprocess", "--source-lang", corpus.src_suffix, "--target-lang", corpus.tgt_suffix,
            "--trainpref", str(bpe_dir / "train"), "--validpref", str(bpe_dir / "valid"),
            "--testpref", str(bpe_dir / "test"), "--destdir", str(bin_dir),
            "--joined-dictionary", "--workers", str(workers),
        ],
        check=True,
    )
    return bin_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("--out", type=Path, help="output directory (default data/work/CORPUS)")
    parser.add_argument("--limit", type=int, help="use only the first N lines of each split")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = args.out or Path(__file__).resolve().parent / "work" / args.corpus
    print(prepare(CORPORA[args.corpus], out, args.limit, args.workers))


if __name__ == "__main__":
    main()
