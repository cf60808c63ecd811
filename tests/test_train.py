"""The training recipe's resume points: a run continues on another machine from a committed,
small file, with its update count, epoch and learning-rate schedule, not from scratch."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from bild_fairseq.pairdir import PairSpec
from data.corpora import CORPORA
from data.train import export_pair, restorable, save_resume_point, train
from tiny import TINY_BIG, random_checkpoint

TINY = ["--encoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "32", "--max-tokens", "1024",
        "--warmup-updates", "10"]


def progress(checkpoint):
    state = torch.load(checkpoint, map_location="cpu")
    return state["optimizer_history"][-1]["num_updates"], state["extra_state"]["previous_training_time"]


def test_a_run_resumes_from_its_committed_resume_point(deen_slice, tmp_path):
    bin_dir = deen_slice / "bin"
    first = train(bin_dir, tmp_path / "machine-a", "small", 1.0, 5, 1, [*TINY, "--max-update", "4"])
    last = first.with_name("checkpoint_last.pt")
    updates, seconds = progress(last)
    assert updates == 4
    point = save_resume_point(last, tmp_path / "checkpoints" / "deen-small.pt")
    # fp16 weights and Adam's second moments factored: a sixth of the training checkpoint
    assert point.stat().st_size < last.stat().st_size / 4
    # ... which expand to Adam's state with every matrix's row and column means, vectors exact
    adam = torch.load(last, map_location="cpu")["last_optimizer_state"]["state"]
    restored = torch.load(restorable(point, tmp_path / "restored.pt"), map_location="cpu")["last_optimizer_state"]["state"]
    assert restored.keys() == adam.keys()
    for i, moments in adam.items():
        second, estimate = moments["exp_avg_sq"], restored[i]["exp_avg_sq"]
        assert estimate.shape == second.shape and restored[i]["step"] == moments["step"] == 4
        assert not restored[i]["exp_avg"].any()
        if second.dim() == 1:
            assert torch.equal(estimate, second)
        else:
            assert torch.allclose(estimate.mean(1), second.mean(1), rtol=1e-4)
            assert torch.allclose(estimate.mean(0), second.mean(0), rtol=1e-4)
    legacy = torch.load(point, map_location="cpu")  # a point written before the moments were kept
    del legacy["adam_second_moments"]
    torch.save(legacy, tmp_path / "legacy.pt")
    assert restorable(tmp_path / "legacy.pt", tmp_path / "unused.pt") == tmp_path / "legacy.pt"

    # another machine: an empty save directory, only the committed point
    save_dir = tmp_path / "machine-b"
    train(bin_dir, save_dir, "small", 1.0, 5, 1, [*TINY, "--max-update", "6"], resume=point)
    log = (save_dir / "train.log").read_text()
    assert f"--restore-file {save_dir / 'resume-point-restored.pt'}" in log and "@ 4 updates" in log
    resumed = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")
    assert progress(save_dir / "checkpoint_last.pt")[0] == 6  # two more updates, not a fresh start
    assert resumed["extra_state"]["previous_training_time"] > seconds  # --stop-time-hours counts the whole run
    # the schedule went on: inverse_sqrt's warm-up reached update 6 of 10, not 2
    assert abs(resumed["last_optimizer_state"]["param_groups"][0]["lr"] - 6e-4) < 1e-5

    # once the save directory has its own checkpoint_last.pt, that one wins
    train(bin_dir, save_dir, "small", 1.0, 5, 1, [*TINY, "--max-update", "7"], resume=point)
    assert progress(save_dir / "checkpoint_last.pt")[0] == 7
    assert (save_dir / "train.log").read_text().count("--restore-file") == 1  # the first command's only


def test_exporting_only_the_big_model_keeps_the_pairs_small_models(deen_slice, tiny_pair, tmp_path):
    """A big model trained on another machine replaces big.pt; the distilled small models stay."""
    work = tmp_path / "work"
    (work / "ckpt-big-iwslt").mkdir(parents=True)
    (work / "bin").symlink_to(deen_slice / "bin")
    (work / "bpe.codes").symlink_to(deen_slice / "bpe.codes")
    new_big = random_checkpoint(deen_slice / "bin", TINY_BIG, work / "ckpt-big-iwslt" / "checkpoint_best.pt", 7)
    pair = shutil.copytree(tiny_pair, tmp_path / "pair")
    (pair / "small-aligned.pt").write_bytes((pair / "small.pt").read_bytes())
    spec = PairSpec.load(pair)
    dataclasses.replace(spec, small="small-aligned.pt").save()
    smalls = {name: (pair / name).read_bytes() for name in ("small.pt", "small-aligned.pt")}

    export_pair(CORPORA["deen"], work, pair, big_size="big-iwslt", roles=("big",))
    assert {name: (pair / name).read_bytes() for name in smalls} == smalls
    name = "encoder.layers.0.fc1.weight"
    assert torch.equal(torch.load(pair / "big.pt")["model"][name], torch.load(new_big)["model"][name].half())
    assert PairSpec.load(pair).small == "small-aligned.pt"

    with pytest.raises(SystemExit, match="no small.pt to keep"):
        export_pair(CORPORA["deen"], work, tmp_path / "empty", big_size="big-iwslt", roles=("big",))
