"""Exported checkpoints: averaging several of one run keeps fairseq's format and tied weights."""
import argparse

import pytest
import torch

from bild_fairseq.checkpoints import CheckpointError, export_for_inference, last_interval_checkpoints, model_settings
from tiny import TINY_BIG, random_checkpoint

TIED = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")


def test_export_averages_checkpoints_keeping_ties(deen_slice, tmp_path):
    paths = [random_checkpoint(deen_slice / "bin", TINY_BIG, tmp_path / f"c{seed}.pt", seed) for seed in (1, 2)]
    states = [torch.load(p)["model"] for p in paths]
    out = torch.load(export_for_inference(paths, tmp_path / "avg.pt", fp16=False))
    model = out["model"]
    assert model.keys() == states[0].keys()
    for name in ("encoder.layers.0.fc1.weight", TIED[0]):
        assert not torch.equal(states[0][name], states[1][name])
        torch.testing.assert_close(model[name], (states[0][name] + states[1][name]) / 2)
    assert model[TIED[0]].data_ptr() == model[TIED[1]].data_ptr()  # still stored once

    from fairseq import checkpoint_utils  # stock fairseq loads the averaged file
    (loaded,), _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "avg.pt")])
    torch.testing.assert_close(loaded.state_dict()["encoder.layers.0.fc1.weight"], model["encoder.layers.0.fc1.weight"])


def _pair_with(tiny_pair, tmp_path, small_bytes: bytes):
    import shutil

    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair, pair)
    (pair / "small.pt").write_bytes(small_bytes)
    return pair


def test_a_small_model_from_another_dictionary_is_named_with_both_sizes(tiny_pair, tiny_summ_pair, tmp_path):
    import pytest

    from bild_fairseq.api import PairTranslator
    from bild_fairseq.checkpoints import CheckpointError

    pair = _pair_with(tiny_pair, tmp_path, (tiny_summ_pair / "small.pt").read_bytes())
    with pytest.raises(CheckpointError) as caught:
        PairTranslator.from_pair_dir(pair)
    message = str(caught.value)
    assert f"{pair / 'small.pt'} was trained with another source dictionary" in message
    assert "fairseq-preprocess --srcdict/--tgtdict" in message and "size mismatch" not in message


def test_a_truncated_checkpoint_is_named(tiny_pair, tmp_path):
    import pytest

    from bild_fairseq.api import PairTranslator
    from bild_fairseq.checkpoints import CheckpointError

    pair = _pair_with(tiny_pair, tmp_path, (tiny_pair / "small.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"{pair / 'small.pt'} is not a readable checkpoint .*truncated"):
        PairTranslator.from_pair_dir(pair)


def test_a_checkpoint_missing_weights_is_named_as_such_not_as_truncated(tiny_pair, tmp_path):
    from bild_fairseq.api import PairTranslator

    state = torch.load(tiny_pair / "small.pt")
    del state["model"]["decoder.layers.0.fc1.weight"]
    pair = _pair_with(tiny_pair, tmp_path, b"")
    torch.save(state, pair / "small.pt")
    with pytest.raises(CheckpointError) as caught:
        PairTranslator.from_pair_dir(pair)
    message = str(caught.value)
    assert f"{pair / 'small.pt'} holds weights of another architecture than its config declares" in message
    assert "missing 1 weight(s), e.g. decoder.layers.0.fc1.weight" in message and "truncated" not in message


def test_model_settings_reads_and_writes_both_config_forms():
    """Older fairseq saves a model's config as an argparse.Namespace, newer as a dict."""
    for cfg in (argparse.Namespace(decoder_layers=6), {"decoder_layers": 6}):
        settings = model_settings(cfg)
        assert settings["decoder_layers"] == 6 and settings.get("arch") is None
        settings["decoder_layers"] = 1
        assert (cfg.decoder_layers if isinstance(cfg, argparse.Namespace) else cfg["decoder_layers"]) == 1


def test_last_interval_checkpoints_are_ordered_by_update_and_counted(tmp_path):
    """What train.py --average-big and bild-jobs distill --average average: the last N by update
    number (not by name: 10000 sorts after 2000), or checkpoint_best.pt for N = 1."""
    for name in ("checkpoint_1_500.pt", "checkpoint_10_10000.pt", "checkpoint_2_2000.pt", "checkpoint_best.pt"):
        (tmp_path / name).touch()
    assert [p.name for p in last_interval_checkpoints(tmp_path, 2)] == ["checkpoint_2_2000.pt", "checkpoint_10_10000.pt"]
    assert last_interval_checkpoints(tmp_path, 1) == [tmp_path / "checkpoint_best.pt"]
    with pytest.raises(CheckpointError, match="holds 3 interval checkpoints but averaging asks for 4"):
        last_interval_checkpoints(tmp_path, 4)
