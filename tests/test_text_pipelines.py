"""The text pipelines a pair can declare (Moses + BPE, SentencePiece, none; per side), on a
SentencePiece model trained here and tiny random checkpoints over its pieces."""
from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece

from bild_fairseq.api import PairTranslator
from bild_fairseq.pairdir import PairDirError, PairSpec
from bild_fairseq.text import Words
from tiny import ROOT, corpus_lines

SPM = {"tokenizer": "sentencepiece", "model": "spm.model"}
NONE = {"tokenizer": "none"}


def spm_pair(checkpoints, out, source: dict, target: dict):
    """A pair directory over the SentencePiece checkpoints with the given per-side pipelines."""
    out.mkdir()
    for name in ("big.pt", "small.pt", "spm.model", "dicts/dict.de.txt", "dicts/dict.en.txt"):
        (out / name.split("/")[-1]).symlink_to(checkpoints / name)
    PairSpec(directory=out, task="translation", source_lang="de", target_lang="en",
             text={"source": source, "target": target}, generation={"max_len_a": 0, "max_len_b": 20}).save()
    return out


def test_sentencepiece_side_encodes_as_the_model_and_round_trips(spm_checkpoints, tmp_path):
    pipe = PairSpec.load(spm_pair(spm_checkpoints, tmp_path / "p", SPM, SPM)).text_pipeline()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_checkpoints / "spm.model"))
    lines = corpus_lines("lohelp.de-en.valid.en.xz", 200)
    assert all(pipe.encode(line, target=True).split() == sp.encode(line, out_type=str) for line in lines)
    exact = sum(pipe.decode(pipe.encode(line, target=True)) == line.strip() for line in lines)
    assert exact == len(lines)  # these lines are NFKC-normal: SentencePiece inverts itself exactly


def test_pre_split_side_keeps_the_units_and_joins_bpe():
    plain = Words(None)
    assert plain.encode("  Klicken   Sie auf OK .") == "Klicken Sie auf OK ."
    assert plain.decode("Klick@@ en Sie auf OK .") == "Klicken Sie auf OK ."  # no Moses detokenizer: as split


def test_each_side_decodes_as_declared_on_tiny_models(spm_checkpoints, tmp_path):
    """Raw text through SentencePiece on both sides gives exactly the pieces the models produce
    from pre-split input, detokenized by SentencePiece; sides may differ."""
    lines = corpus_lines("lohelp.de-en.test.de.xz", 6)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_checkpoints / "spm.model"))
    pre_split = [" ".join(sp.encode(line, out_type=str)) for line in lines]
    units = PairTranslator.from_pair_dir(spm_pair(spm_checkpoints, tmp_path / "none", NONE, NONE)).translate(
        pre_split).hypotheses
    raw = PairTranslator.from_pair_dir(spm_pair(spm_checkpoints, tmp_path / "spm", SPM, SPM)).translate(lines)
    mixed = PairTranslator.from_pair_dir(spm_pair(spm_checkpoints, tmp_path / "mixed", SPM, NONE)).translate(lines)
    assert len({u for u in units}) > 1 and all("▁" in u for u in units)  # varied outputs, as pieces
    assert raw.hypotheses == [sp.decode_pieces(u.split()) for u in units]
    assert not any("▁" in h for h in raw.hypotheses)
    assert mixed.hypotheses == units


def test_pair_json_text_errors_name_the_problem(spm_checkpoints, tmp_path):
    pair = spm_pair(spm_checkpoints, tmp_path / "p", SPM, SPM)
    raw = json.loads((pair / "pair.json").read_text())
    assert "moses_source_lang" not in raw and "bpe_codes" not in raw  # one declaration of the pipeline

    def load_with(**changes):
        (pair / "pair.json").write_text(json.dumps({**raw, **changes}))
        with pytest.raises(PairDirError) as e:
            PairSpec.load(pair).text_pipeline()
        return str(e.value)

    assert "either in \"text\" or in moses_source_lang" in load_with(moses_source_lang="de")
    assert "tokenizer\": one of moses, none, sentencepiece" in load_with(text={"source": SPM, "target": {"tokenizer": "spm"}})
    assert "takes the keys ['model']" in load_with(text={"source": SPM, "target": {"tokenizer": "sentencepiece"}})
    (pair / "spm.model").unlink()
    assert load_with().endswith("missing spm.model")


def test_shipped_pairs_keep_their_moses_bpe_declaration(tmp_path):
    spec = PairSpec.load(ROOT / "data" / "pairs" / "deen")
    assert spec.sides()["target"] == {"tokenizer": "moses", "lang": "en", "bpe_codes": "bpe.codes"}
    assert spec.text_files() == ["bpe.codes"]
    shutil.copy(ROOT / "data" / "pairs" / "deen" / "pair.json", tmp_path / "pair.json")
    spec.directory = tmp_path
    spec.save()
    assert json.loads((tmp_path / "pair.json").read_text()) == json.loads(
        (ROOT / "data" / "pairs" / "deen" / "pair.json").read_text())  # saved as it was: no "text" key
    assert spec.text_pipeline().decode("Klick@@ en Sie auf &quot; OK &quot; .") == 'Klicken Sie auf "OK".'
