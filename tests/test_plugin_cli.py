"""The stock fairseq-generate / fairseq-interactive binaries with --user-dir bild_fairseq --bild."""
import json
import re
import subprocess

import pytest
import torch

from tiny import PLUGIN_DIR, make_tiny_pair


def run(cmd, stdin=None):
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True)


def hypotheses(stdout):
    """{sentence id: (tokens, positional scores)} from fairseq's H-/P- lines."""
    hyps, pos = {}, {}
    for line in stdout.splitlines():
        if line.startswith(("H-", "P-")):
            tag, rest = line.split("\t", 1)
            (hyps if tag[0] == "H" else pos)[int(tag[2:])] = rest.split("\t")[-1]
    return {k: (hyps[k], pos[k]) for k in hyps}


def test_a_generator_the_hook_built_reports_its_statistics_when_freed(tiny_pair, tmp_path, caplog):
    """fairseq-generate has no end-of-run hook: statistics are reported when the generator is
    freed (or at exit), and a generator a program drops is freed, models and all."""
    import gc
    import logging
    import weakref

    from fairseq.data import data_utils
    from fairseq.dataclass.configs import GenerationConfig

    from bild_fairseq.api import PairTranslator

    t = PairTranslator.from_pair_dir(tiny_pair, mode="big")
    cfg = GenerationConfig(beam=1, max_len_b=10)
    cfg.bild, cfg.bild_small_path, cfg.bild_stats_json = True, str(tiny_pair / "small.pt"), str(tmp_path / "s.json")
    generator = t.task.build_generator([t.generator.model.single_model], cfg)
    sources = [t.encode(line)[0] for line in ("Klicken Sie auf OK.", "Die Symbolleiste wird geöffnet.")]
    sample = {"net_input": {"src_tokens": data_utils.collate_tokens(sources, 1, 2, left_pad=True),
                            "src_lengths": torch.tensor([s.numel() for s in sources])}}
    with torch.no_grad():
        generator.generate(generator.model.models, sample)
    alive = weakref.ref(generator)
    with caplog.at_level(logging.INFO, logger="bild_fairseq"):
        del generator
        gc.collect()
    assert alive() is None
    assert json.loads((tmp_path / "s.json").read_text())["sentences"] == 2
    assert "BiLD: 2 sentences" in caplog.text


@pytest.fixture(scope="module")
def test_sets(deen_slice, tmp_path_factory):
    """The first 13 and 80 test sentences of the slice, binarized with its dictionaries."""
    out = {}
    for n in (13, 80):
        d = tmp_path_factory.mktemp(f"test{n}")
        for lang in ("de", "en"):
            lines = (deen_slice / "bpe" / f"test.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (d / f"test.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        proc = run(["fairseq-preprocess", "--source-lang", "de", "--target-lang", "en", "--testpref", str(d / "test"),
                    "--destdir", str(d / "bin"), "--srcdict", str(deen_slice / "bin" / "dict.de.txt"),
                    "--tgtdict", str(deen_slice / "bin" / "dict.en.txt"), "--workers", "1"])
        assert proc.returncode == 0, proc.stderr
        out[n] = d / "bin"
    return out


@pytest.fixture(scope="module")
def generate(test_sets, tiny_pair):
    """fairseq-generate on 80 real test sentences with the tiny pair's big model."""
    base = ["fairseq-generate", str(test_sets[80]), "--user-dir", PLUGIN_DIR, "--path",
            str(tiny_pair / "big.pt"), "--gen-subset", "test", "--max-len-b", "25", "--beam", "1"]
    return lambda *extra: run(base + list(extra))


@pytest.fixture(scope="module")
def stock(generate):
    """Stock fairseq greedy decoding, batches of 16."""
    proc = generate("--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    return proc


def test_generate_exact_bild_equals_stock_greedy_and_reports_stats(generate, stock, tiny_pair, tmp_path):
    stats = tmp_path / "stats.json"
    bild = generate("--batch-size", "16", "--bild", "--bild-small-path", str(tiny_pair / "small.pt"), "--bild-exact",
                    "--bild-fallback-threshold", "0", "--bild-max-small-steps", "4", "--bild-stats-json", str(stats))
    assert bild.returncode == 0, bild.stderr
    ref, got = hypotheses(stock.stdout), hypotheses(bild.stdout)
    assert set(ref) == set(got) == set(range(80))
    for k in ref:
        assert got[k][0] == ref[k][0]
        assert [float(x) for x in got[k][1].split()] == pytest.approx([float(x) for x in ref[k][1].split()], abs=1e-3)
    report = json.loads(stats.read_text())
    assert report["sentences"] == len(ref) and report["rollbacks"] > 0 and report["small_tokens"] > 0
    assert "BiLD: " in bild.stderr and "rollbacks" in bild.stderr


def test_exact_mode_keeps_stocks_length_limit_with_max_len_a(test_sets, tiny_pair):
    """--max-len-a: the limit counts the source as fairseq does (EOS included), so at batch 1
    exact mode equals stock even for outputs that reach it (issue 27, item 12)."""
    base = ["fairseq-generate", str(test_sets[13]), "--user-dir", PLUGIN_DIR, "--path", str(tiny_pair / "big.pt"),
            "--gen-subset", "test", "--beam", "1", "--batch-size", "1", "--max-len-a", "1.2", "--max-len-b", "3"]
    stock = run(base)
    bild = run(base + ["--bild", "--bild-small-path", str(tiny_pair / "small.pt"), "--bild-exact"])
    assert stock.returncode == 0 and bild.returncode == 0, bild.stderr
    ref, got = hypotheses(stock.stdout), hypotheses(bild.stdout)
    assert set(got) == set(ref) == set(range(13)) and all(got[k][0] == ref[k][0] for k in ref)
    # the limit really binds: some outputs stop at it (a * source + b tokens, the source counted with EOS)
    sources = {int(line.split("\t")[0][2:]): len(line.split("\t")[1].split()) + 1
               for line in stock.stdout.splitlines() if line.startswith("S-")}
    assert any(len(ref[k][0].split()) == int(1.2 * sources[k] + 3) for k in ref)


def test_generate_on_onnxruntime_without_bild_is_greedy_decoding_of_the_path_model(generate, stock, tiny_pair):
    """--bild-engine onnxruntime alone: a fast greedy decoder for the --path model, no small
    model needed; its output is stock fairseq's (differences only at near ties, which
    test_engines checks in process), and a finished run's BiLD statistics say who wrote what."""
    ort = generate("--batch-size", "16", "--bild-engine", "onnxruntime")
    assert ort.returncode == 0, ort.stderr
    ref, got = hypotheses(stock.stdout), hypotheses(ort.stdout)
    assert set(got) == set(ref) == set(range(80))
    assert sum(got[k][0] == ref[k][0] for k in ref) >= 0.97 * len(ref)


@pytest.mark.parametrize("options,message", [
    (dict(beam=4), "--beam must be 1"),
    (dict(sampling=True), "--sampling is not supported"),
    (dict(bild_fallback_threshold=1.5), "must be in [0, 1]"),
    (dict(bild_small_path="/nonexistent/small.pt"), "no such readable file"),
    (dict(bild=False, bild_int8=True), "--bild-int8 needs --bild-engine onnxruntime"),
])
def test_bad_options_are_refused_when_the_generator_is_built(tiny_pair, options, message):
    """Where fairseq-generate/-interactive build their generator (``task.build_generator``),
    before any decoding."""
    from fairseq.dataclass.configs import GenerationConfig

    from bild_fairseq.api import PairTranslator
    from bild_fairseq.config import BildOptionError

    t = PairTranslator.from_pair_dir(tiny_pair, mode="big")
    cfg = GenerationConfig(beam=1)
    cfg.bild, cfg.bild_small_path = True, str(tiny_pair / "small.pt")
    for name, value in options.items():
        setattr(cfg, name, value)
    with pytest.raises(BildOptionError, match=re.escape(message)):
        t.task.build_generator([t.generator.model.single_model], cfg)


def test_a_refusal_is_one_line_from_the_command(generate, tiny_pair):
    proc = generate("--bild", "--bild-small-path", "/nonexistent/small.pt")
    assert proc.returncode == 1 and "H-" not in proc.stdout
    # one line, no traceback above it (fairseq does not catch errors; the plugin's excepthook does)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == ["fairseq-generate: error: --bild-small-path /nonexistent/small.pt: no such readable file"]


def test_generate_refuses_small_model_with_other_dictionary(generate, summ_slice, tmp_path):
    other = make_tiny_pair(summ_slice, tmp_path / "other", task="summarization")
    proc = generate("--bild", "--bild-small-path", str(other / "small.pt"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"--bild-small-path: {other / 'small.pt'} was trained with another source dictionary" in proc.stderr


def test_interactive_with_bild(deen_slice, tiny_pair):
    lines = "Klicken Sie auf OK .\nDie Symbol@@ leiste wird geöffnet .\n"
    base = ["fairseq-interactive", str(deen_slice / "bin"), "--user-dir", PLUGIN_DIR, "--path",
            str(tiny_pair / "big.pt"), "--source-lang", "de", "--target-lang", "en", "--beam", "1",
            "--max-len-b", "20"]
    stock = run(base, lines)
    bild = run(base + ["--bild", "--bild-small-path", str(tiny_pair / "small.pt"), "--bild-exact"], lines)
    assert stock.returncode == 0 and bild.returncode == 0, bild.stderr
    assert len(hypotheses(stock.stdout)) == 2
    assert {k: v[0] for k, v in hypotheses(bild.stdout).items()} == {k: v[0] for k, v in hypotheses(stock.stdout).items()}


def test_task_build_generator_gets_bild_from_options_and_small_follows_big_dtype(tiny_pair):
    from fairseq.dataclass.configs import GenerationConfig

    from bild_fairseq.api import PairTranslator
    from bild_fairseq.generator import BildSequenceGenerator

    t = PairTranslator.from_pair_dir(tiny_pair, mode="big")
    big = t.generator.model.single_model.to(torch.bfloat16)
    cfg = GenerationConfig(beam=1)
    cfg.bild, cfg.bild_small_path, cfg.bild_exact = True, str(tiny_pair / "small.pt"), True
    gen = t.task.build_generator([big], cfg)
    assert isinstance(gen, BildSequenceGenerator) and gen.exact
    assert next(gen.small_model.parameters()).dtype == torch.bfloat16
    assert not gen.shared_encoder
    cfg.bild = False
    assert type(t.task.build_generator([big], cfg)).__name__ == "SequenceGenerator"


def test_bild_small_path_takes_a_student_that_shares_the_big_encoder(tiny_pair, tmp_path):
    """fairseq-generate --bild-small-path with a student of the big model's encoder (what
    bild-jobs distill --share-encoder writes): its decoder reads the big encoder's output."""
    from fairseq.dataclass.configs import GenerationConfig

    from bild_fairseq.api import PairTranslator
    from jobs.tuning.shrink import graft

    t = PairTranslator.from_pair_dir(tiny_pair, mode="big")
    cfg = GenerationConfig(beam=1)
    cfg.bild, cfg.bild_small_path = True, str(graft(tiny_pair / "big.pt", tiny_pair / "small.pt", tmp_path / "s.pt"))
    assert t.task.build_generator([t.generator.model.single_model], cfg).shared_encoder


@pytest.mark.parametrize("max_tokens,max_sentences", [(None, 1), (None, 8), (None, 16), (100, None), (300, 16)])
def test_the_batcher_keeps_every_sentence_within_the_limits(max_tokens, max_sentences):
    """fairseq 0.12 drops the last batch unless its size is a multiple of
    --required-batch-size-multiple (8): the plugin's batcher keeps it (fairseq issue #5036)."""
    import numpy as np
    from fairseq.data import data_utils

    import bild_fairseq  # noqa: F401  (installs the hook)

    for n in (13, 101):
        sizes = np.random.default_rng(n).integers(2, 30, n)
        indices = np.argsort(sizes, kind="mergesort")
        def batches(batcher):
            return batcher(indices, lambda i: sizes[i], sizes[indices], max_tokens, max_sentences,
                           required_batch_size_multiple=8)
        kept = batches(data_utils.batch_by_size)
        assert sorted(np.concatenate(kept).tolist()) == list(range(n))
        for b in kept:
            assert len(b) <= (max_sentences or n) and len(b) * sizes[b].max() <= (max_tokens or 10**9)
        if max_sentences != 1:
            assert sum(map(len, batches(data_utils.batch_by_size.__wrapped__))) < n  # stock's drop


def test_generate_decodes_every_sentence(test_sets, tiny_pair):
    """The batcher above, reached through the stock command line: 13 sentences at --batch-size 16."""
    proc = run(["fairseq-generate", str(test_sets[13]), "--user-dir", PLUGIN_DIR, "--path",
                str(tiny_pair / "big.pt"), "--gen-subset", "test", "--max-len-b", "10", "--beam", "1",
                "--batch-size", "16", "--bild", "--bild-small-path", str(tiny_pair / "small.pt")])
    assert proc.returncode == 0, proc.stderr
    assert sorted(hypotheses(proc.stdout)) == list(range(13))


def test_bild_jobs_binarize_makes_data_bin_with_the_pairs_own_encoding(tiny_pair, tmp_path):
    """Quotes and ampersands reach the model as the pair's training data had them (no `&quot;`)."""
    from click.testing import CliRunner

    from jobs.cli import main

    raw = ['Klicken Sie auf "OK" & dann auf <Weiter>.', "", "Tom's & Jerry's \"Symbolleiste\"."]
    src = tmp_path / "raw.de"
    src.write_text("\n".join(raw) + "\n", encoding="utf-8")
    made = CliRunner().invoke(main, ["binarize", str(src), "--pair", str(tiny_pair), "--out", str(tmp_path / "bin")])
    assert made.exit_code == 0, made.output
    assert "3 lines (test split)" in made.output and "fairseq-generate" in made.output
    proc = run(["fairseq-generate", str(tmp_path / "bin"), "--user-dir", PLUGIN_DIR, "--path", str(tiny_pair / "big.pt"),
                "--bild", "--bild-small-path", str(tiny_pair / "small.pt"), "--gen-subset", "test", "--beam", "1",
                "--max-len-b", "5", "--source-lang", "de", "--target-lang", "en", "--remove-bpe"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(hypotheses(proc.stdout)) == [0, 1, 2]
    sources = {line.split("\t")[0]: line.split("\t", 1)[1] for line in proc.stdout.splitlines() if line.startswith("S-")}
    assert sources["S-0"].count('"') == 2 and " & " in sources["S-0"]
    assert "&quot;" not in proc.stdout and "&amp;" not in proc.stdout and "&apos;" not in proc.stdout

    # a rerun replaces only the files it wrote: the user's own file in DATA_BIN stays
    (tmp_path / "bin" / "notes.txt").write_text("mine")
    again = CliRunner().invoke(main, ["binarize", str(src), "--pair", str(tiny_pair), "--out", str(tmp_path / "bin")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "bin" / "notes.txt").read_text() == "mine" and (tmp_path / "bin" / "test.de-en.de.bin").is_file()


def test_bild_jobs_binarize_never_deletes_a_directory_it_did_not_make(tiny_pair, tmp_path):
    from click.testing import CliRunner

    from jobs.cli import main

    src = tmp_path / "raw.de"
    src.write_text("Klicken Sie auf OK.\n", encoding="utf-8")
    for out in (tmp_path, tmp_path / "src-copy"):  # `--out .`, and a file given as the directory
        if out != tmp_path:
            out.write_text("a file")
        refused = CliRunner().invoke(main, ["binarize", str(src), "--pair", str(tiny_pair), "--out", str(out)])
        assert refused.exit_code == 1 and "Traceback" not in refused.output
        assert f"--out {out} is" in refused.output and "give a new or empty directory" in refused.output
    assert src.read_text(encoding="utf-8") == "Klicken Sie auf OK.\n"
    assert (tmp_path / "src-copy").read_text() == "a file"


def _generate_in_process(argv: list[str]) -> None:
    """fairseq-generate's own main, in this process (what the binary runs after parsing)."""
    from fairseq import options
    from fairseq_cli.generate import main

    main(options.parse_args_and_arch(options.get_generation_parser(), argv))


def test_generate_bf16_decodes_both_models_in_bf16_and_fp16_on_cpu_is_refused(test_sets, tiny_pair, monkeypatch,
                                                                              capsys):
    """fairseq 0.12's generate ignores --bf16: the plugin converts, and BiLD's loop then computes
    both models' hidden states in bfloat16 (recorded where each decoder's layers end)."""
    from bild_fairseq.config import BildOptionError
    from bild_fairseq.incremental import IncrementalDecoder

    seen: dict[int, set] = {}
    output = IncrementalDecoder._output

    def spy(self, x):
        seen.setdefault(id(self.decoder), set()).add(x.dtype)
        return output(self, x)

    monkeypatch.setattr(IncrementalDecoder, "_output", spy)
    argv = [str(test_sets[13]), "--user-dir", PLUGIN_DIR, "--path", str(tiny_pair / "big.pt"),
            "--gen-subset", "test", "--max-len-b", "10", "--beam", "1", "--batch-size", "4", "--cpu",
            "--bild", "--bild-small-path", str(tiny_pair / "small.pt")]
    _generate_in_process(argv + ["--bf16"])
    assert len(hypotheses(capsys.readouterr().out)) == 13
    assert list(seen.values()) == [{torch.bfloat16}, {torch.bfloat16}]  # big and small, every call
    with pytest.raises(BildOptionError, match="fp16 needs a GPU"):
        _generate_in_process(argv + ["--fp16"])
