"""``bild-jobs distill`` end to end on a tiny pair and a 40-line slice: the big model's outputs come
from the batch runner, fairseq-train trains a student on them (the small model's decoder on the
big model's frozen encoder), the report compares it with the small model."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner

from bench_fixtures import copy_pair, write_lines
from bild_fairseq.api import PairTranslator
from bild_fairseq.checkpoints import model_settings
from jobs.tuning.distill import distill, model_flags

pytest_plugins = ["jobs_fixtures", "bench_fixtures"]
N_TRAIN = 40


def test_distillation_end_to_end(tiny_pair, tmp_path, caplog):
    pair = copy_pair(tiny_pair, tmp_path / "pair", fallback_threshold=0.05, max_small_steps=4)
    train = write_lines(tmp_path / "train.de", "lohelp.de-en.train.de.xz", 200)
    dev = write_lines(tmp_path / "dev.de", "lohelp.de-en.valid.de.xz", 30)
    dev_ref = write_lines(tmp_path / "dev.en", "lohelp.de-en.valid.en.xz", 30)
    work = tmp_path / "work"
    out = CliRunner().invoke(distill, [
        "--pair", str(pair), "--train-source", str(train), "--dev-source", str(dev), "--dev-ref", str(dev_ref),
        "--workdir", str(work), "--limit", str(N_TRAIN), "--device", "cpu", "--max-update", "4",
        "--warmup-updates", "1", "--lr", "0.01", "--dropout", "0", "--eval-limit", "8", "--install",
        "--share-encoder", "--decoder-layers", "2"])
    assert out.exit_code == 0, out.output + out.stderr + repr(out.exception)

    # 1. the runner decoded the first N_TRAIN training lines with the big model alone
    sources = (work / "teacher.source").read_text().splitlines()
    assert len(sources) == N_TRAIN
    manifest = json.loads((work / "teacher.work" / "manifest.json").read_text())
    assert manifest["decoding"]["requested"]["mode"] == "big"
    big = PairTranslator.from_pair_dir(pair, mode="big")
    assert (work / "teacher.out").read_text().splitlines() == big.translate(sources).hypotheses
    # ... and the dev sources: fairseq-train validates on what the small model should imitate
    dev_teacher = big.translate(dev.read_text().splitlines()).hypotheses
    assert (work / "dev-teacher.out").read_text().splitlines() == dev_teacher
    pipeline = big.spec.text_pipeline()
    own = work / "small-aligned"  # the student's steps 2 and 3
    assert (own / "bpe" / "valid.en").read_text().splitlines() == [pipeline.encode(t, target=True)
                                                                     for t in dev_teacher if t.strip()]

    # 2. fairseq-train trained the small model's decoder, its last layer repeated to 2, on the big
    # model's encoder, frozen, on those outputs; the student ships as a stock transformer
    log = (own / "train.log").read_text()
    assert "loading pretrained model from" in log and "num_updates 4" in log and "transformer_frozen_encoder" in log
    small, teacher = (torch.load(pair / name)["model"] for name in ("small.pt", "big.pt"))
    student = torch.load(work / "small-aligned.pt")
    after = student["model"]
    assert model_settings(student["cfg"]["model"])["arch"] == "transformer"
    encoder = [k for k in after if k.startswith("encoder.")]
    assert encoder == [k for k in teacher if k.startswith("encoder.")]
    trained = torch.load(own / "ckpt" / "checkpoint_best.pt")["model"]
    assert all(trained[k].equal(teacher[k].float()) for k in encoder)  # frozen while training
    assert all(after[k].equal(teacher[k]) for k in encoder)  # shipped as the teacher stores it
    decoder = {k: v.shape for k, v in small.items() if k.startswith("decoder.")}
    assert {k: after[k].shape for k in decoder} == decoder
    assert {k.replace(".layers.1.", ".layers.0.") for k in after if k.startswith("decoder.layers.1.")} == \
        {k for k in decoder if ".layers.0." in k}
    assert any(not small[k].half().equal(after[k]) for k in decoder)  # trained
    dropout = [model_settings(torch.load(p)["cfg"]["model"])["dropout"] for p in (pair / "small.pt", work / "small-aligned.pt")]
    assert dropout == [0.1, 0.0]  # --dropout overrode the small model's own
    assert (pair / "small-aligned.pt").read_bytes() == (work / "small-aligned.pt").read_bytes()  # --install
    assert json.loads((pair / "pair.json").read_text())["shared_encoder"] == ["small-aligned.pt"]
    assert PairTranslator.from_pair_dir(pair, small_checkpoint="small-aligned.pt").generator.shared_encoder
    with caplog.at_level(logging.WARNING, "bild_fairseq"):  # another big model: the student runs its own copy
        other = PairTranslator.from_pair_dir(pair, small_checkpoint="small-aligned.pt", big_checkpoint="small.pt")
    assert not other.generator.shared_encoder
    assert "small-aligned.pt was trained on the big model's encoder but small.pt's encoder differs" in caplog.text

    # 3. the report compares both small models in the benchmark's format
    report = json.loads((own / "report.json").read_text())
    assert set(report["agreement"]) == {"small.pt", "small-aligned.pt"}
    assert all(0 <= a <= 1 for a in report["agreement"].values())
    variants = {r["variant"] for r in report["rows"]}
    assert {"stock", "big", "small", "bild-default", "small@small-aligned", "bild-default@small-aligned"} <= variants
    md = (own / "report.md").read_text()
    assert "| small-aligned.pt |" in md and "| small.pt |" in md and "| batching | variant | time (s)" in md
    exact = [r for r in report["rows"] if r["variant"].startswith("bild-exact")]
    assert len(exact) == 2 and all(r["same_as_stock"] == 8 for r in exact)


def test_model_flags_rebuild_the_architecture(tiny_pair):
    flags = model_flags(tiny_pair / "small.pt")
    assert flags[:2] == ["--arch", "transformer"]
    assert flags[flags.index("--decoder-embed-dim") + 1] == "16" and "--share-decoder-input-output-embed" in flags
    assert "--decoder-learned-pos" not in flags and "--decoder-learned-pos" in model_flags(tiny_pair / "big.pt")


def test_a_student_of_the_big_models_own_layers(tiny_pair, tmp_path):
    from bild_fairseq.pairdir import PairSpec
    from jobs.tuning.distill import student
    from jobs.tuning.shrink import ShrinkError, parse_layers

    spec = PairSpec.load(tiny_pair)
    assert student(spec, None, tmp_path) == tiny_pair / "small.pt"  # default: fine-tune the pair's small model
    big = torch.load(tiny_pair / "big.pt")
    shrunk = student(spec, "0,2/1", tmp_path)  # the tiny big model: 2 encoder, 3 decoder layers
    state = torch.load(shrunk)
    assert (state["cfg"]["model"].decoder_layers, state["cfg"]["model"].encoder_layers) == (2, 1)
    assert flags_value(model_flags(shrunk), "--decoder-layers") == "2"
    for new, old in (("decoder.layers.1.fc1.weight", "decoder.layers.2.fc1.weight"),
                     ("encoder.layers.0.fc1.weight", "encoder.layers.1.fc1.weight"),
                     ("decoder.embed_tokens.weight", "decoder.embed_tokens.weight")):
        assert state["model"][new].dtype == torch.float32 and state["model"][new].equal(big["model"][old].float())
    assert not any(k.startswith("decoder.layers.2.") or k.startswith("encoder.layers.1.") for k in state["model"])

    # keeping every layer is the big model itself: same translations
    everything = copy_pair(tiny_pair, tmp_path / "pair")
    student(PairSpec.load(everything), "0-2", everything)
    (everything / "student-init.pt").rename(everything / "big.pt")
    sources = ["Klicken Sie auf OK.", "Wählen Sie Format - Zeichen."]
    assert PairTranslator.from_pair_dir(everything, mode="big").translate(sources).hypotheses == \
        PairTranslator.from_pair_dir(tiny_pair, mode="big").translate(sources).hypotheses

    assert parse_layers("0-2,4") == [0, 1, 2, 4]
    for bad, message in (("5", "its decoder has layers 0-2; asked to keep \\[5\\]"), ("0,0", "asked to keep"),
                         ("x", "not a list of layer numbers")):
        with pytest.raises(ShrinkError, match=message):
            student(spec, bad, tmp_path)


def flags_value(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


def test_distilling_again_never_overwrites_or_compares_a_model_with_itself(tiny_pair, tmp_path):
    """The shipped pairs' small model is small-aligned.pt, the default --name: the documented
    command run again must not fine-tune it into itself, nor replace it."""
    from bild_fairseq.pairdir import PairSpec
    from jobs.tuning.distill import install_model

    pair = copy_pair(tiny_pair, tmp_path / "pair")
    (pair / "small-aligned.pt").write_bytes((pair / "small.pt").read_bytes())
    spec = PairSpec.load(pair)
    spec.small = "small-aligned.pt"
    spec.save()
    args = ["--pair", str(pair), "--train-source", str(pair / "pair.json"), "--dev-source", str(pair / "pair.json"),
            "--dev-ref", str(pair / "pair.json"), "--workdir", str(tmp_path / "work"), "--device", "cpu"]
    same = CliRunner().invoke(distill, args)
    assert same.exit_code == 2 and "--name small-aligned.pt is the --from model" in same.output
    existing = CliRunner().invoke(distill, [*args, "--from", "small.pt"])
    assert existing.exit_code == 2 and f"{pair} already has that model" in existing.output and "--replace" in existing.output
    assert not (tmp_path / "work").exists()  # refused before any work

    aligned = tmp_path / "new.pt"
    aligned.write_bytes(b"new model")
    kept = install_model(aligned, pair / "small-aligned.pt")
    assert (pair / "small-aligned.pt").read_bytes() == b"new model"
    assert kept.parent == pair and kept.name.startswith("small-aligned.replaced-")
    assert kept.read_bytes() == (pair / "small.pt").read_bytes()
    assert install_model(aligned, pair / "fresh.pt") is None and (pair / "fresh.pt").read_bytes() == b"new model"


def test_the_grafted_decoder_reads_the_big_encoder_as_the_small_one_read_its_own(tiny_pair, tmp_path):
    """--share-encoder's refit: after it, the student's cross-attention keys/values computed from
    the big encoder's states are closer to what the small model computed from its own encoder."""
    from bild_fairseq.incremental import EncoderOutput, cross_attention_kv
    from jobs.tuning.shrink import fit_cross_attention, graft

    pair = copy_pair(tiny_pair, tmp_path / "pair")
    lines = write_lines(tmp_path / "train.de", "lohelp.de-en.train.de.xz", 100).read_text().splitlines()
    graft(pair / "big.pt", pair / "small.pt", pair / "student.pt")
    big, small = (PairTranslator.from_pair_dir(pair, mode=m) for m in ("big", "small"))
    sources = [big.encode(line)[0] for line in lines[:20]]

    def distance() -> float:
        student = PairTranslator.from_pair_dir(pair, mode="small", small_checkpoint="student.pt")
        total = 0.0
        for ids in sources:
            src, n = ids[None], torch.tensor([ids.numel()])
            want = cross_attention_kv(small.generator.model.single_model.decoder, EncoderOutput.of(
                small.generator.model.single_model.encoder(src, src_lengths=n)).states)
            got = cross_attention_kv(student.generator.model.single_model.decoder, EncoderOutput.of(
                big.generator.model.single_model.encoder(src, src_lengths=n)).states)
            total += sum(float(((a - b) ** 2).mean()) for a, b in zip(want, got))
        return total

    with torch.no_grad():
        before = distance()
        r2 = fit_cross_attention(pair / "student.pt", pair, "small.pt", lines)
        after = distance()
    assert 0 < r2 <= 1 and after < 0.8 * before, (r2, before, after)
