"""Exported checkpoints: averaging several of one run keeps fairseq's format and tied weights."""
import torch

from bild_fairseq.checkpoints import export_for_inference
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
