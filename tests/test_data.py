"""Data preparation, text round trips and scoring helpers on the real shipped corpora."""
import shutil

import pytest

from bild_fairseq.pairdir import PairSpec
from bild_fairseq.scoring import bleu, chrf, rouge, score_task
from bild_fairseq.text import TextPipeline
from data.distill_sources import held_out_clean
from data.evaluate import evaluate, markdown
from tiny import ROOT, corpus_lines


def test_prepare_slice_binarizes_with_one_joined_dictionary(deen_slice):
    bin_dir = deen_slice / "bin"
    src_dict, tgt_dict = (bin_dir / "dict.de.txt").read_text(), (bin_dir / "dict.en.txt").read_text()
    assert src_dict == tgt_dict and len(src_dict.splitlines()) > 500
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            assert (bin_dir / f"{split}.de-en.{lang}.bin").stat().st_size > 0
    assert len((deen_slice / "bpe" / "train.de").read_text().splitlines()) == 300
    assert "@@ " in (deen_slice / "bpe" / "train.de").read_text()


def test_summarization_split_is_by_contiguous_blocks():
    import sys

    sys.path.insert(0, str(ROOT / "data"))
    from split_debdesc import split_of

    splits = [split_of(i) for i in range(52319)]
    assert splits.count("test") == 1100 and splits.count("valid") == 1000
    # test lines come in runs of 100 consecutive lines
    starts = [i for i in range(1, len(splits)) if splits[i] == "test" and splits[i - 1] != "test"]
    assert all(splits[s:s + 100] == ["test"] * 100 for s in starts)
    assert len(corpus_lines("debdesc.test.src.xz", 1100)) == 1100


def test_bpe_and_tokenization_round_trip(deen_slice):
    pipe = TextPipeline.moses("de", "en", deen_slice / "bpe.codes")
    lines = corpus_lines("lohelp.de-en.valid.en.xz")
    for line in lines:
        tokenized = pipe.target.tokenize(line)
        bpe = pipe.target.apply_bpe(tokenized)
        assert pipe.decode(bpe) == pipe.target._detok.detokenize(tokenized.split())  # BPE removal is exact
    exact = sum(pipe.decode(pipe.encode(line, target=True)) == line.strip() for line in lines)
    assert exact / len(lines) > 0.9  # Moses detokenization inverts tokenization on most real text (94.5% here)


def test_source_truncation_is_applied_before_bpe():
    pipe = TextPipeline.moses("en", "en", None, max_source_tokens=5)
    assert pipe.encode("one two three four five six seven") == "one two three four five"
    assert pipe.encode("a b", target=True) == "a b"


def test_rouge_averages_documents_with_stemming_and_scores_carry_their_settings():
    """What the project chooses on top of the libraries: ROUGE is the mean of per-document
    F-measures (a summary each), with Porter stemming; BLEU/chrF report sacrebleu's signature."""
    r1, r2, rl = rouge(["the cats sat down", "dogs"], ["the cat sat down", "a bird flew"])
    assert r1.value == pytest.approx(50.0) and r2.value == pytest.approx(50.0) and rl.value == pytest.approx(50.0)
    assert "stemmer:porter" in r1.signature and "avg:docs" in r1.signature
    hyps, refs = ["the cat sat on the mat"], ["the cat sat on a mat"]
    assert 0 < bleu(hyps, refs).value < 100 and 0 < chrf(hyps, refs).value < 100
    assert "tok:13a" in bleu(hyps, refs).signature and "nrefs:1" in chrf(hyps, refs).signature


def test_scores_refuse_misaligned_files_and_pick_the_task_metric():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])
    assert [s.name for s in score_task("summarization", ["a b"], ["a b"])] == ["ROUGE-1", "ROUGE-2", "ROUGE-L"]
    assert [s.name for s in score_task("translation", ["a b"], ["a b"])] == ["BLEU", "chrF"]


def test_evaluate_reports_every_small_model_of_a_pair(tiny_pair, tmp_path):
    """data/evaluate.py scores big, the pair's default small model and any other small*.pt."""
    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair, pair)
    shutil.copy(pair / "small.pt", pair / "small-aligned.pt")
    spec = PairSpec.load(pair)
    spec.small = "small-aligned.pt"
    spec.save()
    report = evaluate("deen", pair, limit=4, step_rounds=1)
    assert {row: m["file"] for row, m in report["models"].items()} == {
        "big": "big.pt", "small": "small-aligned.pt", "small.pt": "small.pt"}
    assert report["test_lines"] == 4 and report["decoder_macs_ratio"] > 0 and report["decoder_step_time_ratio"] > 0
    assert all(m["decoder_step_ms"] > 0 for m in report["models"].values())  # each model's step was timed
    md = markdown(report, "python data/evaluate.py deen")
    assert "| small (`small-aligned.pt`) |" in md and "| small.pt (`small.pt`) |" in md


def test_evaluate_scores_a_checkpoint_outside_the_pair_as_its_big_model(tiny_pair, tmp_path):
    """--big: a training checkpoint elsewhere replaces big.pt (here: the small model, so its row shows)."""
    elsewhere = tmp_path / "ckpt" / "checkpoint_best.pt"
    elsewhere.parent.mkdir()
    shutil.copy(tiny_pair / "small.pt", elsewhere)
    report = evaluate("deen", tiny_pair, limit=4, big=elsewhere, step_rounds=1)
    big, small = report["models"]["big"], report["models"]["small"]
    assert big["file"] == "checkpoint_best.pt" and big["parameters"] == small["parameters"]
    assert big["scores"] == small["scores"]  # the same model decodes the same lines alike
    assert evaluate("deen", tiny_pair, limit=4, step_rounds=1)["models"]["big"]["parameters"] != small["parameters"]


def test_distillation_sources_leave_out_text_of_the_held_out_splits():
    """A DDTP paragraph quoting six words of a valid/test description would make valid agreement
    a training measure: it is dropped, as are short lines, training lines and repeats."""
    held = ["Foo is a tool to convert images between many formats quickly and safely."]
    train = ["Bar reads mail from several accounts and sorts it into folders by rules it learns."]
    fresh = "Baz draws plots of data from files or pipes, with labels, legends and colours, in many styles."
    extra = [
        "This one says it can convert images between many formats quickly and has nothing else in common.",
        "Short synopsis line",
        train[0],
        fresh,
        fresh,
    ]
    assert held_out_clean(extra, train, held, min_words=15) == [fresh]
    assert held_out_clean(extra, train, held) == ["Short synopsis line", fresh]
