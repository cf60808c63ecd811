"""`bild-jobs pair init` on SentencePiece checkpoints made in the tests: the checks refuse what
does not fit in one line, the tuned pair.json follows its own sweep, and the pair decodes raw text
through `bild-jobs run --bild` and `fairseq-generate --bild` from a directory outside the clone."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import sentencepiece
from click.testing import CliRunner

from bild_fairseq.api import PairTranslator
from bild_fairseq.config import SETTINGS
from bild_fairseq.pairdir import PairSpec
from jobs.cli import main
from jobs.tuning.agreement import pair_agreement
from jobs.tuning.pairinit import default_mode
from tiny import ROOT, TINY_BIG, TINY_SMALL, corpus_lines, random_checkpoint

LANGS = ["--source-lang", "de", "--target-lang", "en"]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    return {"dev.de": write_lines(d / "dev.de", corpus_lines("lohelp.de-en.valid.de.xz", 20)),
            "dev.en": write_lines(d / "dev.en", corpus_lines("lohelp.de-en.valid.en.xz", 20)),
            "test.de": write_lines(d / "test.de", corpus_lines("lohelp.de-en.test.de.xz", 7))}


def init_args(ckpt, out, *extra):
    return ["pair", "init", str(out), "--big", str(ckpt / "big.pt"), "--small", str(ckpt / "small.pt"),
            "--dicts", str(ckpt / "dicts"), *LANGS, "--text", f"sentencepiece:{ckpt / 'spm.model'}", *extra]


@pytest.fixture(scope="module")
def made_pair(spm_checkpoints, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("made") / "my-pair"
    result = CliRunner().invoke(main, init_args(spm_checkpoints, out, "--dev-source", str(texts["dev.de"]),
                                                "--dev-ref", str(texts["dev.en"]), "--max-len-b", "20",
                                                "--fallback", "0.3,0.7", "--rollback", "2,5"))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_pair_init_writes_a_complete_pair_tuned_by_its_own_sweep(made_pair, spm_checkpoints, texts):
    out, output = made_pair
    spec = PairSpec.load(out)
    assert spec.sides() == {side: {"tokenizer": "sentencepiece", "model": "spm.model"} for side in ("source", "target")}
    assert (out / "spm.model").read_bytes() == (spm_checkpoints / "spm.model").read_bytes()
    assert "checked: source tokenization on 20 lines: 100% round-trip" in output
    points = json.loads((out / "sweep" / "points.json").read_text())["points"]
    assert {p["kind"] for p in points} == {"big", "small", "exact", "bild"} and len(points) == 7
    mode, chosen = default_mode(points, 0.5)
    assert spec.run["mode"] == mode and spec.run["engine"] == "torch"
    if chosen is not None:
        assert spec.bild == {k: chosen[k] for k in SETTINGS}
        assert f"{chosen['speedup']:.2f}x" in spec.run["why"]
    (share, tokens), = pair_agreement(out, corpus_lines("lohelp.de-en.valid.de.xz", 20)).values()
    assert f"agreement {100 * share:.1f}% of {tokens} big-model tokens" in spec.run["why"]
    big = next(p for p in points if p["kind"] == "big")
    assert f"big BLEU {big['quality']:.2f}" in spec.run["why"]


def test_default_mode_is_bild_only_when_a_setting_within_budget_is_clearly_faster():
    def point(name, kind, speedup, quality):
        return {"name": name, "kind": kind, "speedup": speedup, "quality": quality}

    big, small = point("big", "big", 1.0, 30.0), point("small", "small", 3.0, 20.0)
    fast_bad, fast_ok, slow_ok = (point("a", "bild", 2.0, 28.0), point("b", "bild", 1.5, 29.6),
                                  point("c", "bild", 0.8, 30.0))
    assert default_mode([big, small, fast_bad, fast_ok, slow_ok], 0.5) == ("bild", fast_ok)
    assert default_mode([big, small, fast_bad, slow_ok], 0.5) == ("big", slow_ok)  # thresholds for --bild
    assert default_mode([big, small, fast_bad], 0.5) == ("big", None)
    within_noise = point("d", "bild", 1.05, 30.0)  # under MIN_SPEEDUP: one run's noise
    assert default_mode([big, small, within_noise], 0.5) == ("big", within_noise)


@pytest.fixture(scope="module")
def misfits(spm_checkpoints, tmp_path_factory):
    """Checkpoints and dictionaries that do not pair with the SentencePiece big model."""
    d = tmp_path_factory.mktemp("misfits")
    (d / "other").mkdir()
    lines = (spm_checkpoints / "dicts" / "dict.en.txt").read_text(encoding="utf-8").splitlines()
    for lang in ("de", "en"):
        write_lines(d / "other" / f"dict.{lang}.txt", lines + ["extra 1"])
    random_checkpoint(d / "other", TINY_SMALL, d / "other-dict.pt", seed=5, extra=LANGS)
    random_checkpoint(spm_checkpoints / "dicts", TINY_BIG, d / "cross-self.pt", seed=6,
                      extra=[*LANGS, "--cross-self-attention"])
    (d / "swapped").mkdir()
    swapped = lines[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    for lang in ("de", "en"):
        write_lines(d / "swapped" / f"dict.{lang}.txt", swapped)
    dev = corpus_lines("lohelp.de-en.valid.de.xz", 9)
    write_lines(d / "rare.txt", [" ".join(dev[i:i + 3]) + " ✓" for i in (0, 3, 6)])
    return d


@pytest.mark.parametrize("change,message", [
    ({"--small": "other-dict.pt"}, "--small: {misfits}/other-dict.pt was trained with another source dictionary"),
    ({"--big": "cross-self.pt"}, "--big {misfits}/cross-self.pt: TransformerDecoderBase: BiLD's multi-token decoder "
                                 "does not support cross_self_attention"),
    ({"--small-dicts": "swapped"}, "--small-dicts: {misfits}/swapped/dict.de.txt differs from the big model's at entry 4"),
    ({"--text": "none"}, "--text: 93% of the source sample's 259 units are not in the source dictionary"),
    ({"--dev-source": None, "--dev-ref": None, "--sample": "rare.txt"},  # one character the dictionary lacks a line
     "--text: only 0% of 3 source sample lines come back with their characters from encoding, the dictionary"),
    ({"--text": "spm:x.model"}, "--text 'spm:x.model': expected sentencepiece:MODEL, moses:LANG[+bpe:CODES]"),
    ({"--dev-source": None, "--dev-ref": None}, "give --dev-source/--dev-ref (or --sample FILE of source lines)"),
    ({"--dev-ref": None}, "--dev-source and --dev-ref go together"),
])
def test_pair_init_refuses_what_does_not_fit_in_one_line_before_writing(spm_checkpoints, texts, misfits, tmp_path,
                                                                        change, message):
    args = dict(zip(init_args(spm_checkpoints, tmp_path / "p")[3::2], init_args(spm_checkpoints, tmp_path / "p")[4::2]))
    args.update({"--dev-source": str(texts["dev.de"]), "--dev-ref": str(texts["dev.en"])})
    for option, value in change.items():
        if value is None:
            del args[option]
        else:
            args[option] = value if option == "--text" else str(misfits / value)
    result = CliRunner().invoke(main, ["pair", "init", str(tmp_path / "p"), *(x for kv in args.items() for x in kv)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message.format(misfits=misfits) in errors[0], result.output
    assert not (tmp_path / "p").exists()


def test_pair_init_refuses_a_directory_in_use(spm_checkpoints, texts, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, init_args(spm_checkpoints, tmp_path / "p", "--sample", str(texts["dev.de"])))
    assert result.exit_code == 1 and "exists and is not empty: give a new directory" in result.output


def test_made_pair_decodes_raw_text_with_run_and_fairseq_generate_from_outside_the_clone(made_pair, texts, tmp_path):
    """The issue's "done when": raw text in, detokenized lines out, line-aligned, both ways, run
    from a directory outside the clone with relative paths."""
    pair, _ = made_pair
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(texts["test.de"], work / "test.de")
    os.symlink(pair, work / "my-pair")
    lines = corpus_lines("lohelp.de-en.test.de.xz", 7)
    spec = PairSpec.load(pair)

    def sh(*cmd):
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    sh("bild-jobs", "run", "test.de", "--pair", "my-pair", "-o", "test.en", "--bild", "--no-progress")
    run_output = (work / "test.en").read_text(encoding="utf-8").splitlines()
    expected = PairTranslator.from_pair_dir(pair, mode="bild").translate(lines).hypotheses
    assert run_output == expected and len(run_output) == len(lines)
    assert not any("▁" in line for line in run_output) and len(set(run_output)) > 1

    made = CliRunner().invoke(main, ["binarize", str(work / "test.de"), "--pair", str(pair), "--out", str(work / "bin")])
    assert made.exit_code == 0 and "--remove-bpe sentencepiece" in made.output, made.output
    plugin = sh("bild-jobs", "plugin-dir").strip()
    assert plugin == str(ROOT / "bild_fairseq")
    thresholds = [f"--bild-{k.replace('_', '-')}={spec.bild[k]}" for k in ("fallback_threshold", "rollback_threshold",
                                                                          "max_small_steps")]
    out = sh("fairseq-generate", "bin", "--user-dir", plugin, "--path", "my-pair/big.pt", "--bild",
             "--bild-small-path", "my-pair/small.pt", *thresholds, "--gen-subset", "test", "--beam", "1",
             "--max-len-b", "20", *LANGS, "--remove-bpe", "sentencepiece")
    detok = {int(tag[2:]): text for tag, _, text in (line.split("\t") for line in out.splitlines()
                                                     if line.startswith("D-"))}
    assert [detok[i] for i in range(len(lines))] == run_output
    sp = sentencepiece.SentencePieceProcessor(model_file=str(pair / "spm.model"))
    assert all(sp.decode(sp.encode(line)) == line for line in run_output)  # detokenized text, not pieces
