"""Shared by the runner's tests (``pytest_plugins = ["jobs_fixtures"]``): real corpus lines,
their single-process decoding as the reference, and the ``bild-jobs`` console script."""
from __future__ import annotations

import lzma
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "corpora" / "lohelp.de-en.test.de.xz"
REFERENCE = ROOT / "data" / "corpora" / "lohelp.de-en.test.en.xz"
BILD_JOBS = Path(sys.executable).parent / "bild-jobs"
N_LINES = 300


def real_lines(path: Path, n: int) -> list[bytes]:
    with lzma.open(path, "rb") as f:
        return [line.rstrip(b"\n") for line in islice(f, n)]


def read_output(path: Path) -> list[str]:
    """Output lines exactly (every line ends with a newline; none may be lost or added)."""
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return text.split("\n")[:-1]


def bild_jobs(*args: str | Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed console script, as a user would."""
    return subprocess.run([str(BILD_JOBS), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def translate_in_process(pair: Path, lines: list[str]) -> list[str]:
    from bild_fairseq.api import PairTranslator

    return PairTranslator.from_pair_dir(pair, device="cpu").translate(lines).hypotheses


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """300 real German lines (as .xz, like the shipped corpora) and their English references."""
    d = tmp_path_factory.mktemp("corpus")
    src, ref = d / "input.de.xz", d / "ref.en"
    src.write_bytes(lzma.compress(b"".join(line + b"\n" for line in real_lines(CORPUS, N_LINES))))
    ref.write_bytes(b"".join(line + b"\n" for line in real_lines(REFERENCE, N_LINES)))
    return src, ref


@pytest.fixture(scope="session")
def reference_output(tiny_pair, corpus) -> list[str]:
    """The whole corpus decoded by one in-process call of the API: what every run must reproduce."""
    return translate_in_process(tiny_pair, [line.decode() for line in real_lines(corpus[0], N_LINES)])
