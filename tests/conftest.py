from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs one worker per core (pytest.ini): each worker's torch, and every process it
    # starts, keeps to one thread, so the workers do not oversubscribe the cores
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def deen_slice(tmp_path_factory) -> Path:
    """A 300-line slice of the real LibreOffice-help corpus, prepared by the real recipe."""
    return tiny.prepare_slice("deen", tmp_path_factory.mktemp("deen-slice"))


@pytest.fixture(scope="session")
def summ_slice(tmp_path_factory) -> Path:
    return tiny.prepare_slice("summ", tmp_path_factory.mktemp("summ-slice"))


@pytest.fixture(scope="session")
def tiny_pair(deen_slice, tmp_path_factory) -> Path:
    """Random tiny de-en pair directory (mechanics only; quality tests use data/pairs)."""
    return tiny.make_tiny_pair(deen_slice, tmp_path_factory.mktemp("tiny-pair"))


@pytest.fixture(scope="session")
def tiny_summ_pair(summ_slice, tmp_path_factory) -> Path:
    return tiny.make_tiny_pair(summ_slice, tmp_path_factory.mktemp("tiny-summ-pair"), task="summarization",
                               max_source_tokens=80)


@pytest.fixture(scope="session")
def spm_checkpoints(tmp_path_factory) -> Path:
    """A SentencePiece model trained here, its fairseq dictionaries and a random big/small pair."""
    return tiny.sentencepiece_checkpoints(tmp_path_factory.mktemp("spm-checkpoints"))


# exported ONNX graphs of the tests' throwaway models go to a directory of their own, not the user's cache
os.environ.setdefault("BILD_ONNX_CACHE", tempfile.mkdtemp(prefix="bild-onnx-tests-"))
