"""``bild-jobs bench`` on a tiny random pair: every variant and batching measured, every column
filled, exact mode and the big-only loop equal to stock fairseq. Speed numbers are not asserted."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench_fixtures import CORPORA, write_lines
from jobs.tuning.agreement import agreement
from jobs.tuning.bench import Suite, bench
from jobs.tuning.benchreport import BEGIN, END, update_section
from jobs.tuning.measure import Batching, MeasureError, PairModels, Variant, encode, measure
from jobs_fixtures import ROOT, real_lines

pytest_plugins = ["jobs_fixtures", "bench_fixtures"]
N_LINES = 6
ENGINE_VARIANTS = ["big", "bild-exact", "bild-default", "bild-tuned"]
VARIANTS = ["stock", "big", "small", "bild-exact", "bild-default", "bild-tuned",
            *(v + tag for tag in ("/ort", "/ort8") for v in ENGINE_VARIANTS), "ct2-fp32", "ct2-int8"]
BATCHINGS = ["batch 1", "max-tokens 120"]


@pytest.fixture(scope="module")
def run(active_pair, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    suites = d / "suites.json"
    suites.write_text(json.dumps({"suites": [{
        "name": "tiny", "pair": str(active_pair),
        "source": str(write_lines(d / "src.de", "lohelp.de-en.test.de.xz", N_LINES)),
        "reference": str(write_lines(d / "ref.en", "lohelp.de-en.test.en.xz", N_LINES)),
        "small": [{"checkpoint": None, "tuned": {"fallback_threshold": 0.0, "rollback_threshold": 3.0,
                                                 "max_small_steps": 6}}]}]}))
    shutil.copy(ROOT / "benchmarks" / "targets.json", d / "targets.json")  # the project's targets, as data
    (d / "BENCHMARKS.md").write_text("# Benchmarks\n\nanalysis written by hand\n")
    out = CliRunner().invoke(bench, [str(suites), "--out", str(d / "out"), "--repeats", "2", "--no-memory",
                                     "--batch", "1", "--batch", "tokens:120",
                                     "--update-markdown", str(d / "BENCHMARKS.md")])
    assert out.exit_code == 0, out.output + out.stderr + repr(out.exception)
    return d, json.loads((d / "out" / "bench.json").read_text()), out.stdout


def test_every_variant_and_batching_is_measured(run):
    _, result, _ = run
    suite = result["suites"][0]
    assert result["repeats"] == 2 and result["machine"]["logical_cpus"] >= 1 and suite["lines"] == N_LINES
    assert set(suite["model_sha256"]) == {"big.pt", "small.pt"}
    assert [(r["batching"], r["variant"]) for r in suite["rows"]] == [(b, v) for b in BATCHINGS for v in VARIANTS]
    for r in suite["rows"]:
        assert len(r["seconds"]) == 2 and min(r["seconds"]) <= r["median_seconds"] <= max(r["seconds"])
        assert r["tokens"] >= N_LINES and r["tokens_per_second"] > r["sentences_per_second"] > 0
        assert set(r["scores"]) == {"BLEU", "chrF"}
        if r["variant"] == "stock":
            assert r["speedup_vs_stock"] == 1.0
    tuned = next(r for r in suite["rows"] if r["variant"] == "bild-tuned")
    assert tuned["stats"]["small_tokens"] > 0 and tuned["stats"]["rollbacks"] > 0
    assert 0 < tuned["big_token_share"] < 1 and 0 <= tuned["fallback_rate"] <= 1 and 0 < tuned["rollback_rate"] <= 1
    assert 0 <= suite["agreement"]["small.pt"] <= 1


def test_exact_mode_and_big_loop_output_equals_stock_fairseq(run):
    _, result, _ = run
    suite = result["suites"][0]
    for r in suite["rows"]:
        if r["variant"] in ("big", "bild-exact"):
            assert r["same_as_stock"] == N_LINES, r
        if r["variant"].startswith("bild-exact"):  # on every engine: its own big-only greedy output
            assert r["same_as_big"] == N_LINES, r
    ties = suite["differences"]["big/ort"]  # ORT fp32 greedy vs stock: only near ties differ
    assert ties["reference"] == "stock" and ties["lines"] == N_LINES and ties["near_ties"] == ties["differing"]
    # the CPU contract for the torch engine stays strict: no difference at all, not even near ties
    assert suite["differences"]["big"]["differing"] == suite["differences"]["bild-exact"]["differing"] == 0
    assert suite["differences"]["bild-exact/ort8"]["reference"] == "big/ort8"
    exact = next(r for r in suite["rows"] if r["variant"] == "bild-exact/ort8")
    assert exact["stats"]["small_tokens"] > 0  # the small model really contributed


def test_engine_accounting_covers_every_engine(run):
    """Call costs per engine and model, and the loop's bookkeeping per iteration at batch 1."""
    _, result, _ = run
    suite = result["suites"][0]
    assert set(suite["call_costs_ms"]) == {f"{e} {m}" for e in ("torch", "ort fp32", "ort int8") for m in ("big", "small")}
    for costs in suite["call_costs_ms"].values():
        assert set(costs) == {"forward k=1", "forward k=2", "forward k=4", "forward k=8", "step"}
        assert all(ms > 0 for ms in costs.values())
    loop = suite["loop_batch1"]
    assert set(loop) == {v for v in VARIANTS if v.startswith(("big", "bild"))}
    tokens = {r["variant"]: r["tokens"] for r in suite["rows"] if r["batching"] == "batch 1"}
    for name, split in loop.items():
        assert split["bookkeeping_ms_per_iteration"] > 0 and split["model_ms"] > 0
        if name.startswith("big"):  # the greedy loop: one iteration and one step per token
            assert split["iterations"] == tokens[name] == split["calls"]["big step"]["calls"]
        else:
            assert split["calls"]["small step"]["calls"] == split["iterations"] >= tokens[name]


def test_ctranslate2_rows_decode_the_converted_big_model(run):
    """The peer's plumbing: CTranslate2's converter ran on the tiny big model, and its fp32 greedy
    output is fairseq's (token ids in, token ids out: nothing re-tokenized)."""
    _, result, _ = run
    suite = result["suites"][0]
    assert any("CTranslate2 conversion" in n for n in suite["notes"])
    for r in suite["rows"]:
        if r["variant"] == "ct2-fp32":
            assert r["same_as_stock"] >= N_LINES - 1, r
        if r["variant"] == "ct2-int8":
            assert r["tokens"] >= N_LINES and "stats" not in r


def test_missing_ctranslate2_skips_its_rows_with_a_note(active_pair, tmp_path, monkeypatch):
    import jobs.tuning.bench

    monkeypatch.setattr(jobs.tuning.bench, "ct2_missing", lambda: "CTranslate2 is not installed")
    suites = tmp_path / "suites.json"
    suites.write_text(json.dumps({"suites": [{
        "name": "tiny", "pair": str(active_pair),
        "source": str(write_lines(tmp_path / "src.de", "lohelp.de-en.test.de.xz", 2)),
        "reference": str(write_lines(tmp_path / "ref.en", "lohelp.de-en.test.en.xz", 2))}]}))
    out = CliRunner().invoke(bench, [str(suites), "--out", str(tmp_path / "out"), "--repeats", "1",
                                     "--batch", "1", "--engine", "torch", "--no-memory"])
    assert out.exit_code == 0, out.output
    suite = json.loads((tmp_path / "out" / "bench.json").read_text())["suites"][0]
    assert not any(r["variant"].startswith("ct2") for r in suite["rows"])
    assert not any("/ort" in r["variant"] for r in suite["rows"])  # --engine torch only
    assert "Note: CTranslate2 rows skipped: CTranslate2 is not installed." in (tmp_path / "out" / "bench.md").read_text()


def test_the_memory_pass_measures_a_variant_in_a_process_of_its_own(active_pair, tmp_path):
    """What ``bench --memory`` runs per variant: a fresh process that loads only that variant's
    models, its peak reset before each batching (so a later batching is not billed an earlier
    one's peak)."""
    from jobs.tuning.peakmem import peak_memory

    lines = [line.decode() for line in real_lines(CORPORA / "lohelp.de-en.test.de.xz", 4)]
    variant = {"name": "bild", "mode": "bild", "fallback_threshold": 0.0}
    got = peak_memory(active_pair, variant, lines, [(1, 10**6), (None, 200)], "cpu", 1, tmp_path)
    assert set(got) == {"batch 1", "max-tokens 200"}
    for m in got.values():
        assert m["peak_rss_mib"] >= m["loaded_rss_mib"] > 0 and "peak_cuda_mib" not in m


def test_the_peak_is_reset_to_what_the_process_holds_now():
    import numpy as np

    from jobs.tuning.peakmem import MIB, _reset_peak, _status_kib

    block = np.ones(256 * 2**20 // 8)  # 256 MiB, written
    high = _status_kib("VmHWM")
    del block
    _reset_peak()
    assert _status_kib("VmHWM") < high - 200 * MIB


def test_markdown_has_every_column_and_the_targets(run):
    d, result, stdout = run
    md = (d / "out" / "bench.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| batching"))
    for column in ["time (s)", "sent/s", "tok/s", "× stock", "× big", "BLEU", "chrF", "= stock",
                   "= big (same engine)", "fallback", "rollback", "big tokens", "peak RSS (MiB)"]:
        assert f" {column} |" in header
    rows = [line for line in md.splitlines() if line.startswith("| batch ") or line.startswith("| max-tokens")]
    assert len(rows) == len(BATCHINGS) * len(VARIANTS)
    assert f"output identical to stock, every batching | bild-exact | {N_LINES}/{N_LINES} lines | met" in md
    assert f"output identical to big/ort8 (same engine), every batching | bild-exact/ort8 | {N_LINES}/{N_LINES} lines | met" in md
    assert "| ORT 8-bit big-only greedy >= 1.0x CTranslate2 int8, batch 1 | big/ort8 |" in md
    assert "| ort int8 big |" in md and "bookkeeping ms/iteration" in md
    assert "--big-only --engine onnxruntime --int8" in md
    assert md in stdout and "`bild-jobs run` flags" in md and "--fallback-threshold 0 --rollback-threshold 3" in md
    assert "--repeats 2" in result["command"] and "suites.json" in result["command"]
    page = (d / "BENCHMARKS.md").read_text()
    assert page.startswith("# Benchmarks\n\nanalysis written by hand\n") and md.strip() in page


def test_targets_are_read_from_data_and_checked_as_written():
    """A hand-made suite: a speed target with a quality budget, the fastest-within-budget pick,
    identical output, a peer that was not run (no row), a batching that was not measured."""
    from jobs.tuning.targets import check

    def row(batching, name, seconds, bleu, same=10):
        return {"batching": batching, "variant": name, "median_seconds": seconds, "scores": {"BLEU": bleu},
                "same_as_stock": same, "same_as_big": same}
    variants = [{"name": "stock", "mode": "stock"}, {"name": "big", "mode": "big"},
                {"name": "fast", "mode": "bild", "exact": False, "engine": "onnxruntime"},
                {"name": "faster", "mode": "bild", "exact": False, "engine": "onnxruntime"},
                {"name": "exact", "mode": "bild", "exact": True}, {"name": "ct", "mode": "ct2", "compute_type": "int8"}]
    rows = [row("batch 1", "stock", 4.0, 20.0), row("batch 1", "big", 3.0, 20.0), row("batch 1", "fast", 2.0, 19.8),
            row("batch 1", "faster", 1.0, 19.0), row("batch 1", "exact", 2.5, 20.0, same=9), row("batch 1", "ct", 1.5, 20.0)]
    suite = {"rows": rows, "variants": variants, "lines": 10, "task": "translation"}
    rules = {"quality_budget": 0.5, "targets": [
        {"target": "lossy >= {min}x stock at {batching}, {metric} within {budget}", "variants": {"mode": "bild", "exact": False},
         "vs": "stock", "at": "every", "min": 2.5, "quality": True},
        {"target": "identical", "variants": {"exact": True}, "same_as": "stock"},
        {"target": "fastest vs ct2 at {batching}", "fastest_of": {"engine": "onnxruntime"}, "vs": "ct2 int8",
         "at": ["batch 1", "batch 16"], "min": 1.0},
        {"target": "vs fp32 peer", "variants": {"name": "big"}, "vs": "ct2 float32", "min": 1.0}]}
    got = [(t["target"], t["variant"], t["measured"], t["passed"]) for t in check(suite, rules)]
    assert got == [("lossy >= 2.5x stock at batch 1, BLEU within 0.5", "fast", "2.00x, BLEU -0.20", False),
                   ("lossy >= 2.5x stock at batch 1, BLEU within 0.5", "faster", "4.00x, BLEU -1.00", False),
                   ("identical", "exact", "9/10 lines", False),
                   ("fastest vs ct2 at batch 1", "fast", "0.75x", False)]  # "faster" is over budget; batch 16 not run


def test_a_broken_targets_file_stops_the_benchmark_in_one_line(active_pair, tmp_path):
    suites = tmp_path / "suites.json"
    suites.write_text(json.dumps({"suites": [{"name": "tiny", "pair": str(active_pair),
                                              "source": str(write_lines(tmp_path / "s", "lohelp.de-en.test.de.xz", 1)),
                                              "reference": str(write_lines(tmp_path / "r", "lohelp.de-en.test.en.xz", 1))}]}))
    (tmp_path / "targets.json").write_text('{"targets": "all of them"}')
    out = CliRunner().invoke(bench, [str(suites), "--out", str(tmp_path / "out")])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert f"{tmp_path / 'targets.json'}: expected an object with a 'targets' list" in out.output


def test_update_section_replaces_only_the_generated_block(tmp_path):
    page = tmp_path / "B.md"
    update_section(page, "first")
    page.write_text("intro\n" + page.read_text() + "outro\n")
    update_section(page, "second")
    assert page.read_text() == f"intro\n{BEGIN}\nsecond\n{END}\noutro\n"


def test_agreement_of_the_big_model_with_its_own_output_is_total(active_pair):
    models = PairModels(active_pair, [Variant("big", "big"), Variant("small", "small")])
    big = models.translator(Variant("big", "big"))
    lines = [line.decode() for line in real_lines(CORPORA / "lohelp.de-en.test.de.xz", 12)]
    sources = encode(big, lines)
    outputs = measure({"big": big}, sources, Batching(4, 10_000), 1)["big"].tokens
    tgt = big.task.target_dictionary
    forced = sum(o.numel() > big.settings["max_len_b"] for o in outputs)  # EOS forced at max length
    assert agreement(models.big, sources, outputs, tgt.pad(), tgt.eos()) == pytest.approx(1.0, abs=forced / 100 + 1e-6)
    assert agreement(models.small[None], sources, outputs, tgt.pad(), tgt.eos()) < 0.5


def test_agreement_command_reports_each_small_model(active_pair, tmp_path, capsys):
    from jobs.tuning.agreement import main

    source = write_lines(tmp_path / "src.de", "lohelp.de-en.test.de.xz", 12)
    main([str(active_pair), str(source), "big.pt", "small.pt"])
    shares = {line.split(":")[0]: float(line.split(": ")[1].split("%")[0]) for line in capsys.readouterr().out.splitlines()}
    assert set(shares) == {"big.pt", "small.pt"}
    assert shares["big.pt"] > 95 and shares["small.pt"] < 50  # the big model agrees with itself


@pytest.mark.parametrize("bad,message", [
    (lambda: Variant("y", "big", fallback_threshold=0.5), "mode 'bild' only"),
    (lambda: Batching.parse("many"), "expected a batch size"),
    (lambda: Variant("x", "beam"), "mode must be one of"),
])
def test_bad_variants_and_batchings_are_refused(bad, message):
    with pytest.raises(MeasureError, match=message):
        bad()


def test_bench_refuses_an_unknown_suite(tmp_path):
    suites = tmp_path / "s.json"
    suites.write_text(json.dumps({"suites": [{"name": "a", "pair": ".", "source": "x", "reference": "y"}]}))
    out = CliRunner().invoke(bench, [str(suites), "--suite", "b"])
    assert out.exit_code != 0 and "no suite named ['b']" in out.stderr


def test_device_strings_map_to_each_runtimes_arguments():
    """(issue 28, item 2) CTranslate2 wants device and index apart; no GPU needed to check."""
    from jobs.tuning.peers import ct2_device

    assert ct2_device("cpu") == {"device": "cpu", "device_index": 0}
    assert ct2_device("cuda") == {"device": "cuda", "device_index": 0}
    assert ct2_device("cuda:1") == {"device": "cuda", "device_index": 1}


def test_the_memory_pass_runs_one_process_at_a_time_on_a_gpu():
    """(issue 28, item 3) side by side on one GPU the processes would hold several CUDA contexts."""
    import os

    from jobs.tuning.bench import memory_workers

    assert memory_workers("cuda", 8) == memory_workers("cuda:1", 8) == 1
    assert memory_workers("cpu", 8) == min(8, os.cpu_count() or 1) and memory_workers("cpu", 1) == 1


def test_every_tool_refuses_fp16_on_the_cpu_in_one_line(tmp_path):
    """bench, sweep and distill take --precision; fp16 without a GPU is refused before any work."""
    from jobs.tuning.distill import distill
    from jobs.tuning.sweep import sweep_command

    pair, text = Path(__file__).resolve().parent.parent / "data" / "pairs" / "deen", tmp_path / "t.txt"
    text.write_text("eins\n")
    suites = tmp_path / "s.json"
    suites.write_text(json.dumps({"suites": [{"name": "a", "pair": str(pair), "source": str(text), "reference": str(text)}]}))
    calls = {bench: [str(suites), "--device", "cpu"],
             sweep_command: ["--pair", str(pair), "--input", str(text), "--ref", str(text), "--out", str(tmp_path / "o")],
             distill: ["--pair", str(pair), "--train-source", str(text), "--dev-source", str(text), "--dev-ref", str(text),
                       "--workdir", str(tmp_path / "w"), "--device", "cpu"]}
    for command, args in calls.items():
        out = CliRunner().invoke(command, [*args, "--precision", "fp16"])
        assert out.exit_code == 1 and "fp16 needs a GPU (asked on cpu): on the CPU use bf16 or fp32" in out.stderr
        assert "Traceback" not in out.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_ctranslate2_rows_follow_the_precision_and_a_missing_compute_type_is_a_note(active_pair):
    """--precision bf16: the CTranslate2 row is ct2-bf16; where CTranslate2 lacks that compute
    type (this CPU has no bfloat16), the row is skipped with a note naming what it has."""
    import ctranslate2

    from jobs.tuning.peers import CT2Generator, PeerUnavailable

    suite = Suite("s", active_pair, active_pair, active_pair)
    assert [v.name for v in suite.variants(precision="bf16") if v.mode == "ct2"] == ["ct2-bf16", "ct2-int8"]
    if "bfloat16" in ctranslate2.get_supported_compute_types("cpu"):
        pytest.skip("this CPU's CTranslate2 has bfloat16")
    with pytest.raises(PeerUnavailable, match="CTranslate2 has no bfloat16 compute type on cpu here \\(it has "):
        CT2Generator(active_pair, None, None, "bfloat16", 10)
