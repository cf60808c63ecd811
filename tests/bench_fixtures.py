"""Shared by the benchmark, sweep and distillation tests: real corpus lines as plain files, and a
copy of the tiny pair whose pair.json thresholds let the small model actually propose tokens."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bild_fairseq.pairdir import PairSpec
from jobs_fixtures import ROOT, real_lines

CORPORA = ROOT / "data" / "corpora"
# the tiny random small model is rarely 60% sure of anything: with pair.json's 0.6 every step
# would fall back and BiLD would never use a small-model token
ACTIVE_BILD = {"fallback_threshold": 0.05, "rollback_threshold": 1.0, "max_small_steps": 4}


def write_lines(path: Path, corpus_file: str, n: int) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in real_lines(CORPORA / corpus_file, n)))
    return path


def copy_pair(pair: Path, dest: Path, **bild) -> Path:
    shutil.copytree(pair, dest)
    spec = PairSpec.load(dest)
    spec.bild = {**spec.bild, **bild}
    spec.save()
    return dest


@pytest.fixture(scope="session")
def active_pair(tiny_pair, tmp_path_factory) -> Path:
    return copy_pair(tiny_pair, tmp_path_factory.mktemp("active") / "pair", **ACTIVE_BILD)
