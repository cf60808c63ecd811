"""Split the Debian description->synopsis corpus into train/valid/test by contiguous blocks.

The corpus is ordered by package name and sibling packages (foo, foo-dev, foo-doc) carry
near-identical descriptions, so a random split would leak test documents into training.
Lines are grouped into blocks of 100 consecutive lines; block b goes to test if b % 50 == 7,
to valid if b % 50 == 32, else to train (1,100 / 1,000 / 50,219 pairs).

    python data/split_debdesc.py ../shared/corpora data/corpora
"""
import lzma
import sys
from pathlib import Path

BLOCK = 100


def split_of(line_no: int) -> str:
    block = line_no // BLOCK
    return "test" if block % 50 == 7 else "valid" if block % 50 == 32 else "train"


def main(src_dir: str, out_dir: str) -> None:
    sides = {}
    for side, name in (("src", "source"), ("tgt", "target")):
        with lzma.open(Path(src_dir) / f"debdesc.{name}.xz", "rt", encoding="utf-8") as f:
            sides[side] = f.read().splitlines()
    if len(sides["src"]) != len(sides["tgt"]):
        sys.exit(f"debdesc source/target line counts differ: {len(sides['src'])} vs {len(sides['tgt'])}")
    for side, lines in sides.items():
        parts: dict = {}
        for i, line in enumerate(lines):
            parts.setdefault(split_of(i), []).append(line)
        for split, part in parts.items():
            with lzma.open(Path(out_dir) / f"debdesc.{split}.{side}.xz", "wt", encoding="utf-8", preset=9) as f:
                f.write("\n".join(part) + "\n")
            print(f"debdesc.{split}.{side}: {len(part)} lines")


if __name__ == "__main__":
    main(*sys.argv[1:3])
