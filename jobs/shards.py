"""A corpus as line-range shards, read by streaming (plain, gzip or xz): never whole in memory.

A line is what ends with ``\\n`` (a last line without one counts too); a ``\\r`` before it is dropped.
Lines are bytes until :func:`decode_line`, so no newline convention or invalid UTF-8 can change
how many lines there are: the output stays aligned with what ``wc -l``-style tools see.
"""
from __future__ import annotations

import gzip
import hashlib
import lzma
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Iterator

_MAGIC = ((b"\x1f\x8b", gzip.open), (b"\xfd7zXZ\x00", lzma.open))
_CHUNK = 1 << 20
#: input whose first MiB is more than this share of NUL bytes and invalid UTF-8 is not text
MAX_NOT_TEXT_SHARE = 0.05


def open_corpus(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, decompressing gzip/xz by content (not by file name)."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, opener in _MAGIC:
        if head.startswith(magic):
            return opener(path, "rb")
    return open(path, "rb")


def iter_lines(path: Path, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
    """Lines ``[start, stop)`` of ``path`` without their line ending.

    Compressed files cannot seek, so the lines before ``start`` are read and skipped: cheap next to
    decoding them, and it keeps shards independent of any index file.
    """
    with open_corpus(path) as f:
        for raw in islice(f, start, stop):
            yield raw.removesuffix(b"\n").removesuffix(b"\r")


def decode_line(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text of a line, and whether it had invalid bytes (then replaced by U+FFFD)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def not_text_share(path: Path) -> float:
    """The share of NUL bytes and bytes that are not UTF-8 in the first MiB of the (decompressed)
    content: near 0 for any text, large for a program or an image given by mistake."""
    with open_corpus(path) as f:
        sample = f.read(_CHUNK)
    text = sample.decode("utf-8", errors="surrogateescape")  # each invalid byte -> one U+DC80..U+DCFF
    bad = text.count("\0") + sum(1 for c in text if "\udc80" <= c <= "\udcff")
    return bad / len(sample) if sample else 0.0


def read_lines(path: Path, limit: int | None = None) -> list[str]:
    """The first ``limit`` lines (all if None) of a plain, gzip or xz text file, as text."""
    return [decode_line(raw)[0] for raw in iter_lines(Path(path), 0, limit)]


@dataclass(frozen=True)
class CorpusScan:
    lines: int
    sha256: str  # of the decompressed content: the same text gzipped or not is the same corpus


def scan(path: Path) -> CorpusScan:
    """Count lines and hash the content in one streaming pass."""
    digest, lines, last = hashlib.sha256(), 0, b"\n"
    with open_corpus(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return CorpusScan(lines + (last != b"\n"), digest.hexdigest())


def plan(lines: int, shards: int) -> list[range]:
    """``shards`` contiguous line ranges covering ``lines``, sizes differing by at most one.

    Callers clamp ``shards`` to the line count first; an empty corpus is one empty shard.
    """
    if shards < 1:
        raise ValueError(f"the number of shards must be >= 1, got {shards}")
    if shards > max(lines, 1):
        raise ValueError(f"{shards} shards for {lines} lines: at most one shard per line")
    base, extra = divmod(lines, shards)
    bounds = [0]
    for i in range(shards):
        bounds.append(bounds[-1] + base + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]
