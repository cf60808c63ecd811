"""Weights-only checkpoint loading: fairseq checkpoints load, anything else is refused unexecuted."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

from bild_fairseq.safe_load import UnsafeCheckpointError
from tiny import PLUGIN_DIR


class _RunsCode:
    """Unpickling this calls os.system (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious(tmp_path, tiny_pair):
    marker = tmp_path / "pwned"
    state = torch.load(tiny_pair / "big.pt")
    state["extra_state"]["payload"] = _RunsCode(marker)
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    return path, marker


def test_fairseq_checkpoint_needs_the_allow_list_and_loads_with_it(tiny_pair):
    # without the plugin, torch's weights-only default rejects fairseq's argparse.Namespace config
    code = ("import torch,sys\ntry:\n torch.load(sys.argv[1])\nexcept Exception as e:\n print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_pair / "big.pt")], capture_output=True, text=True).stdout
    assert "argparse.Namespace" in out
    from fairseq import checkpoint_utils

    import bild_fairseq  # noqa: F401

    state = checkpoint_utils.load_checkpoint_to_cpu(str(tiny_pair / "big.pt"))
    assert "decoder.embed_tokens.weight" in state["model"]


def test_malicious_checkpoint_is_refused_and_never_runs(malicious):
    from fairseq import checkpoint_utils

    import bild_fairseq  # noqa: F401

    path, marker = malicious
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system") as err:
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert "Nothing in it was executed" in str(err.value)
    assert isinstance(err.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_stock_fairseq_generate_refuses_malicious_checkpoint(malicious, tiny_pair, deen_slice):
    path, marker = malicious
    proc = subprocess.run(
        ["fairseq-generate", str(deen_slice / "bin"), "--user-dir", PLUGIN_DIR, "--path", str(path),
         "--beam", "1", "--max-sentences", "2"],
        capture_output=True, text=True)
    assert proc.returncode == 1
    # one line from the plugin's excepthook, not a traceback
    assert "fairseq-generate: error: " in proc.stderr and "refusing to load checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
