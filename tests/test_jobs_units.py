"""The runner's parts without models: reading and sharding corpora, config hashing, atomic
writes, shard bookkeeping, bad-line isolation, Slurm array specs."""
from __future__ import annotations

import gzip
import os
import lzma
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.config import ConfigError, Decoding, RunConfig
from jobs.executors.slurm import SlurmExecutor, SlurmOptions, array_spec
from jobs.manifest import merge_stats
from jobs.shards import decode_line, iter_lines, plan, scan
from jobs.worker import BatchSize, IsolatingDecoder, ProgressFile, run_shard
from jobs.workdir import ShardRecord, WorkDir, atomic_writer

# CRLF, an empty line, invalid UTF-8, a form feed and U+2028 (line breaks to str.splitlines,
# not to a corpus), and a last line without a newline
RAW = b"eins\r\n\nzwei \xff\xfe drei\nvier\x0cf\xc3\xbcnf\xe2\x80\xa8sechs\n\nlast"
LINES = [b"eins", b"", b"zwei \xff\xfe drei", b"vier\x0cf\xc3\xbcnf\xe2\x80\xa8sechs", b"", b"last"]


@pytest.fixture(params=["plain", "gz", "xz"])
def corpus(request, tmp_path) -> Path:
    path = tmp_path / "corpus.txt"  # the same name for all: compression is detected by content
    path.write_bytes({"plain": RAW, "gz": gzip.compress(RAW), "xz": lzma.compress(RAW)}[request.param])
    return path


def test_lines_are_split_on_newlines_only_whatever_the_compression(corpus):
    assert list(iter_lines(corpus)) == LINES
    assert list(iter_lines(corpus, 2, 4)) == LINES[2:4]
    info = scan(corpus)
    assert info.lines == len(LINES)
    assert info.sha256 == scan(_plain(corpus.parent, RAW)).sha256  # content, not file, identity


def _plain(directory: Path, data: bytes) -> Path:
    path = directory / "plain-copy.txt"
    path.write_bytes(data)
    return path


def test_line_count_with_and_without_final_newline(tmp_path):
    for data, lines in [(b"", 0), (b"\n", 1), (b"a", 1), (b"a\n", 1), (b"a\nb", 2), (b"a\n\n", 2)]:
        path = _plain(tmp_path, data)
        assert scan(path).lines == lines == len(list(iter_lines(path))), data


def test_invalid_utf8_is_replaced_and_flagged():
    assert decode_line(b"f\xc3\xbcnf") == ("fünf", False)
    text, invalid = decode_line(b"zwei \xff drei")
    assert invalid and text == "zwei \ufffd drei"


@pytest.mark.parametrize("lines,shards", [(10, 3), (7, 7), (1000, 16), (5, 1), (0, 1)])
def test_plan_covers_every_line_once_in_order(lines, shards):
    ranges = plan(lines, shards)
    assert len(ranges) == shards
    assert [i for r in ranges for i in r] == list(range(lines))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_plan_refuses_more_shards_than_lines():
    with pytest.raises(ValueError, match="at most one shard per line"):
        plan(3, 4)


def _config(**changes) -> RunConfig:
    base = dict(input="/data/in.de", input_sha256="ab" * 32, lines=100, shards=4, pair_dir="/pairs/deen",
                task="translation", pair_fingerprint={"big.pt": "1", "pair.json": "2"}, decoding=Decoding(),
                output="/out/hyp.en")
    return RunConfig(**{**base, **changes})


def test_config_hash_covers_what_changes_the_output_and_nothing_else():
    base = _config()
    for same in [dict(input="/elsewhere/in.de"), dict(output="/x"), dict(max_tokens=100), dict(device="cuda"),
                 dict(pair_dir="/copied/pair")]:
        assert _config(**same).hash == base.hash, same
    for changed in [dict(input_sha256="cd" * 32), dict(shards=5), dict(lines=101),
                    dict(pair_fingerprint={"big.pt": "3", "pair.json": "2"}),
                    dict(decoding=Decoding(fallback_threshold=0.5)), dict(decoding=Decoding(mode="big", beam=4))]:
        assert _config(**changed).hash != base.hash, changed
    diff = _config(decoding=Decoding(fallback_threshold=0.5)).differences(base)
    assert diff == ["decoding.fallback_threshold: None -> 0.5"]


def test_config_roundtrip(tmp_path):
    cfg = _config(decoding=Decoding(mode="small", beam=5, small_checkpoint="small-aligned.pt"))
    cfg.save(tmp_path / "config.json")
    loaded = RunConfig.load(tmp_path / "config.json")
    assert loaded == cfg and loaded.hash == cfg.hash and loaded.decoding.beam == 5


@pytest.mark.parametrize("options,message", [
    (dict(mode="bild", beam=4), "BiLD decodes greedily"),
    (dict(exact=True, fallback_threshold=0.5), "takes no thresholds"),
    (dict(mode="big", rollback_threshold=2.0), "apply to BiLD decoding"),
    (dict(mode="big", small_checkpoint="small-aligned.pt"), "no effect with --big-only"),
    (dict(mode="beam"), "decoding mode"),
])
def test_contradictory_decoding_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        Decoding(**options)


def test_atomic_writer_leaves_nothing_behind_when_the_writer_dies(tmp_path):
    target = tmp_path / "00001.out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(target) as f:
            f.write("half a shard\n")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_writer(target) as f:
        f.write("whole\n")
    assert target.read_text() == "whole\n" and list(tmp_path.iterdir()) == [target]


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    """Array tasks on two nodes may have the same pid: the temporary name holds the host and a
    random part too, so interleaved writers each publish a whole file."""
    target = tmp_path / "00001.json"
    with atomic_writer(target) as first:
        with atomic_writer(target) as second:
            second.write("second\n")
        first.write("first\n")
        assert os.uname().nodename in first.name and str(os.getpid()) in first.name
    assert target.read_text() == "first\n" and list(tmp_path.iterdir()) == [target]


def test_a_file_system_without_locks_is_named_as_such(tmp_path, monkeypatch):
    import errno
    import fcntl

    from jobs.workdir import WorkDirError

    def no_locks(f, flags):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(WorkDirError, match=f"the file system of {tmp_path} does not support file locks .*-o flock"):
        with WorkDir(tmp_path).lock():
            pass


def test_a_shard_is_done_only_with_a_done_record_of_this_config_and_its_output(tmp_path):
    wd = WorkDir(tmp_path)
    wd.create()
    record = ShardRecord(index=2, start=10, stop=20, config_hash="h1", status="running", attempt=1)
    wd.write_record(record)
    wd.output(2).write_text("x\n" * 10)
    assert not wd.is_done(2, "h1")  # output of a worker that was killed before its record
    record.status = "done"
    wd.write_record(record)
    assert wd.is_done(2, "h1") and not wd.is_done(2, "h2")
    wd.output(2).unlink()
    assert not wd.is_done(2, "h1")


def test_attempts_are_numbered_by_the_driver_and_taken_by_the_worker(tmp_path):
    wd = WorkDir(tmp_path)
    wd.create()
    assert wd.start_attempt(0, "h1") == 1  # never queued: a hand-submitted job script
    assert wd.queue(0, range(0, 5), "h1").attempt == 1
    assert wd.start_attempt(0, "h1") == 1
    record = wd.read_record(0)
    record.status = "failed"
    wd.write_record(record)
    assert wd.queue(0, range(0, 5), "h1").attempt == 2
    assert wd.queue(0, range(0, 5), "h2").attempt == 1  # another config starts over


def test_work_directory_lock_is_exclusive(tmp_path):
    from jobs.workdir import WorkDirError

    wd = WorkDir(tmp_path)
    with wd.lock():
        with pytest.raises(WorkDirError, match="in use by another bild-jobs process"):
            with WorkDir(tmp_path).lock():
                pass
    with wd.lock():  # released
        pass


@dataclass
class _Out:
    hypotheses: list
    issues: list
    stats: dict


class _FakeTranslator:
    """Upper-cases lines, reporting progress line by line; raises on any batch holding a line with
    "BOOM", and raises ``inject[k]`` on its k-th call (an environment fault that passes)."""

    def __init__(self, inject: dict[int, Exception] | None = None):
        self.calls, self.inject, self.seen, self.batches = 0, inject or {}, [], []

    def translate(self, lines, progress=None, max_tokens=4096, max_sentences=None):
        self.calls += 1
        self.batches.append((max_tokens, max_sentences))
        if self.calls in self.inject:
            raise self.inject[self.calls]
        for line in lines:
            if "BOOM" in line:
                raise RuntimeError("cannot decode this\nsecond line of the message")
            progress(1)
        self.seen += lines
        return _Out([line.upper() for line in lines], [], {"sentences": len(lines), "tokens": 2 * len(lines)})

    def config_dict(self) -> dict:
        return {"mode": "fake"}


class _Progress(ProgressFile):
    """Records what it would show after each report."""

    def __init__(self, path: Path, total: int):
        super().__init__(path, total)
        self.shown = []

    def __call__(self, lines: int) -> None:
        super().__call__(lines)
        self.shown.append(self.done + self.pending)


def _decoder(translator, tmp_path, n: int, max_tokens: int = 4096) -> IsolatingDecoder:
    return IsolatingDecoder(translator, _Progress(tmp_path / "progress", n), BatchSize(max_tokens))


def test_lines_the_decoder_cannot_process_get_empty_outputs_and_issues_and_count_once(tmp_path):
    lines = [f"line {i}" for i in range(20)]
    lines[3] = lines[17] = "BOOM"
    decoder = _decoder(_FakeTranslator(), tmp_path, len(lines))
    hyps, issues, stats = decoder.decode(lines, 0)
    assert hyps == ["" if line == "BOOM" else line.upper() for line in lines]
    error = "RuntimeError: cannot decode this"  # the headline; the whole message goes to the log
    assert issues == [[3, "failed", error], [17, "failed", error]]
    assert merge_stats(stats)["sentences"] == 18
    # lines decoded again while bisecting count once: the progress reaches 18 with the last line
    shown = decoder.progress.shown
    assert decoder.progress.done == 18 and max(shown) == 18 and shown.index(18) == len(shown) - 1


def test_a_decoder_failing_on_every_line_fails_the_shard_instead_of_emptying_it(tmp_path):
    translator = _FakeTranslator()
    with pytest.raises(RuntimeError, match="cannot decode"):
        _decoder(translator, tmp_path, 100).decode(["BOOM"] * 100, 0)
    assert translator.calls < 100  # gave up early


def test_a_transient_fault_is_never_charged_to_a_line(tmp_path, capsys):
    """Out of memory on the first 8 calls (none after): the batch shrinks, every line is decoded."""
    import torch

    lines = [f"line {i}" for i in range(30)]
    oom = {k: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") for k in range(1, 9)}
    translator = _FakeTranslator(oom)
    decoder = _decoder(translator, tmp_path, len(lines), max_tokens=4096)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # 8 halvings reach one sentence per batch: the shard fails
        decoder.decode(lines, 0)
    assert decoder.failed == [] and translator.batches[-1] == (32, 1)
    translator = _FakeTranslator({k: RuntimeError("DefaultCPUAllocator: can't allocate memory") for k in range(1, 4)})
    decoder = _decoder(translator, tmp_path, len(lines))
    hyps, issues, _ = decoder.decode(lines, 0)
    assert hyps == [line.upper() for line in lines] and issues == []
    assert translator.batches == [(4096, None), (2048, None), (1024, None), (512, None)]
    assert "out of memory at --max-tokens 1024 (RuntimeError: DefaultCPUAllocator" in capsys.readouterr().out
    # a fault that passes on a one-line call: the line is decoded again, not emptied
    translator = _FakeTranslator({1: RuntimeError("flaky")})
    assert _decoder(translator, tmp_path, 1).decode(["eins"], 0)[:2] == (["EINS"], [])
    # the machine's faults fail the shard, to be retried: no line is charged
    for error in (OSError(5, "Input/output error"), MemoryError(), RuntimeError("CUDA error: an illegal memory access")):
        decoder = _decoder(_FakeTranslator({1: error}), tmp_path, len(lines))
        with pytest.raises(type(error)):
            decoder.decode(lines, 0)
        assert decoder.failed == []


def test_merge_stats_recomputes_ratios_from_sums():
    a = {"tokens": 10, "big_tokens": 10, "small_tokens": 0, "big_calls": 10, "big_token_share": 1.0}
    b = {"tokens": 90, "big_tokens": 0, "small_tokens": 90, "big_calls": 3, "big_token_share": 0.0}
    total = merge_stats([a, b])
    assert total["tokens"] == 100 and total["big_token_share"] == pytest.approx(0.1)
    assert total["tokens_per_big_call"] == pytest.approx(100 / 13)


def test_array_spec_compresses_ranges():
    assert array_spec([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert array_spec([3]) == "3"
    assert array_spec(range(10), max_parallel=2) == "0-9%2"


def test_slurm_job_script_uses_this_python_and_the_options(tmp_path):
    options = SlurmOptions(partition="gpu", time="2:00:00", gpus_per_task=1, cpus_per_task=4, mem="16G",
                           max_parallel=8, extra=("--account=nlp", "--qos=high"))
    executor = SlurmExecutor(WorkDir(tmp_path), ["/opt/venv/bin/python"], options, job_name="bild-x")
    script = executor.job_script()
    for line in ["#SBATCH --partition=gpu", "#SBATCH --time=2:00:00", "#SBATCH --gres=gpu:1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16G", "#SBATCH --account=nlp", "#SBATCH --qos=high",
                 f"#SBATCH --output={tmp_path}/logs/shard-%5a.slurm-%A.log",
                 f'exec /opt/venv/bin/python -m jobs.worker {tmp_path} "$SLURM_ARRAY_TASK_ID"']:
        assert line in script.splitlines(), line
    assert "CUDA_VISIBLE_DEVICES=" not in script  # GPUs were asked for
    assert executor.sbatch_command([0, 1, 2, 4])[:3] == ["sbatch", "--parsable", "--array=0-2,4%8"]


def test_thresholds_are_checked_against_the_pair_before_any_work(tiny_pair):
    from bild_fairseq.pairdir import PairSpec

    spec = PairSpec.load(tiny_pair)
    Decoding(fallback_threshold=0.9).check_pair(spec)
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\]"):
        Decoding(fallback_threshold=1.5).check_pair(spec)
    with pytest.raises(ConfigError, match="max-small-steps must be >= 1"):
        Decoding(max_small_steps=0).check_pair(spec)
    with pytest.raises(ConfigError, match="wait-share must be in \\[0, 1\\]"):
        Decoding(wait_share=2.0).check_pair(spec)


def test_the_mode_is_the_given_one_else_bild_for_bild_options_else_the_pairs_measured_default(tiny_pair):
    from dataclasses import replace

    from bild_fairseq.pairdir import PairSpec

    spec = PairSpec.load(tiny_pair)
    measured = replace(spec, run={"mode": "big", "why": "measured faster"})
    assert Decoding().resolve(spec).mode == "bild"  # no "run" in pair.json: BiLD
    assert Decoding().resolve(measured).mode == "big"
    assert Decoding(mode="bild").resolve(measured).mode == "bild"
    assert Decoding(wait_share=0.5).resolve(measured).mode == "bild"
    assert Decoding(exact=True).resolve(measured).mode == "bild"
    assert Decoding(beam=4).resolve(measured) == Decoding(mode="big", beam=4, engine="torch", int8=False)
    with pytest.raises(ConfigError, match="BiLD decodes greedily"):
        Decoding(beam=4).resolve(spec)


def test_the_engine_is_the_given_one_else_the_pairs_measured_default_where_it_fits(tiny_pair):
    from dataclasses import replace

    from bild_fairseq.pairdir import PairSpec

    spec = PairSpec.load(tiny_pair)
    fast = replace(spec, run={"mode": "big", "engine": "onnxruntime", "precision": "int8", "why": "measured"})
    runtime = lambda d, s=fast: (lambda r: (r.engine, r.int8))(d.resolve(s))  # noqa: E731
    assert runtime(Decoding(), spec) == ("torch", False)  # no engine in pair.json: torch
    assert runtime(Decoding()) == ("onnxruntime", True)
    assert runtime(Decoding(int8=False)) == ("onnxruntime", False)
    assert runtime(Decoding(engine="torch")) == ("torch", False)
    assert runtime(Decoding(mode="big", beam=4)) == ("torch", False)  # beam search: torch's
    with pytest.raises(ConfigError, match="int8 \(8-bit weights\) is a precision of the onnxruntime engine"):
        Decoding(engine="torch", int8=True)
    # a run made before engines existed (torch, fp32) keeps its configuration hash
    torch_fp32 = _config(decoding=Decoding(mode="big", engine="torch", int8=False))
    assert "engine" not in torch_fp32.hashed()["decoding"] and torch_fp32.hash == _config(decoding=Decoding(mode="big")).hash
    assert _config(decoding=Decoding(mode="big", engine="onnxruntime", int8=True)).hash != torch_fp32.hash


def test_precision_is_hashed_and_work_directories_from_before_it_resume(tmp_path):
    """fp32 and fp16 hash as the former fp16 flag did, and a config.json that still has that
    flag loads with the same hash; bf16 is another configuration."""
    import json
    from dataclasses import asdict

    fp16 = _config(decoding=Decoding(precision="fp16"))
    hashes = {p: _config(decoding=Decoding(precision=p)).hash for p in ("fp32", "fp16", "bf16")}
    assert len(set(hashes.values())) == 3
    for precision, flag in (("fp32", False), ("fp16", True)):
        old = {**asdict(_config(decoding=Decoding(precision=precision))), "hash": ""}
        old["decoding"] = {**{k: v for k, v in old["decoding"].items() if k != "precision"}, "fp16": flag}
        (tmp_path / "config.json").write_text(json.dumps(old))
        loaded = RunConfig.load(tmp_path / "config.json")
        assert loaded.decoding.precision == precision and loaded.hash == hashes[precision]
    assert fp16.hashed()["decoding"]["fp16"] is True
    with pytest.raises(ConfigError, match="precision must be one of fp32, fp16, bf16, got 'fp64'"):
        Decoding(precision="fp64")
    with pytest.raises(ConfigError, match="use engine torch for beam search, fp16 and bf16"):
        Decoding(engine="onnxruntime", precision="bf16")


def test_local_slots_one_per_visible_gpu_or_cpu_workers_with_a_share_of_cores(monkeypatch):
    from jobs.executors.local import plan_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    half = str(max(1, cores // 2))  # GPU workers get a share of the cores too, not torch's all-cores default
    assert plan_slots("auto", None) == [{"CUDA_VISIBLE_DEVICES": g, "OMP_NUM_THREADS": half, "MKL_NUM_THREADS": half}
                                        for g in ("2", "5")]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in plan_slots("cuda", 3)] == ["2", "5", "2"]
    cpu = plan_slots("cpu", 3)
    assert cpu == [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(max(1, cores // 3)),
                    "MKL_NUM_THREADS": str(max(1, cores // 3))}] * 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert plan_slots("auto", 2) == plan_slots("cpu", 2)  # no GPU visible: CPU workers
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's own setting wins over the fair share
    assert {s["OMP_NUM_THREADS"] for s in plan_slots("cpu", 1)} == {"1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS='many'"):
        plan_slots("cpu", 1)
    monkeypatch.delenv("OMP_NUM_THREADS")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        plan_slots("cuda", None)


def test_an_option_equal_to_the_pairs_own_is_not_a_change(tiny_pair):
    from bild_fairseq.pairdir import PairSpec

    spec = PairSpec.load(tiny_pair)
    given = Decoding(fallback_threshold=spec.bild["fallback_threshold"], max_small_steps=spec.bild["max_small_steps"],
                     small_checkpoint=spec.small, max_len_b=spec.generation["max_len_b"])
    assert given.canonical(spec) == Decoding()
    assert _config(decoding=given.canonical(spec)).hash == _config().hash
    other = Decoding(fallback_threshold=spec.bild["fallback_threshold"] / 2).canonical(spec)
    assert other.fallback_threshold == spec.bild["fallback_threshold"] / 2


def test_the_pair_fingerprint_covers_the_pair_json_settings_the_output_depends_on(tiny_pair):
    from dataclasses import replace

    from bild_fairseq.pairdir import PairSpec
    from jobs.config import pair_fingerprint

    spec = PairSpec.load(tiny_pair)
    digest = lambda path: path.name  # noqa: E731  (the files are the same; only pair.json's settings vary)
    retuned = replace(spec, bild={**spec.bild, "fallback_threshold": 0.1},
                      run={"mode": "big", "why": "measured"})
    repoliced = replace(spec, bild={**spec.bild, "wait_share": 0.9, "verify_drafting": True})
    longer = replace(spec, generation={**spec.generation, "max_len_b": 7})
    big, bild = Decoding(mode="big"), Decoding(mode="bild")
    # a big-only run does not read BiLD's settings nor the run's default mode
    assert pair_fingerprint(retuned, big, digest) == pair_fingerprint(spec, big, digest)
    assert pair_fingerprint(retuned, bild, digest) != pair_fingerprint(spec, bild, digest)
    # the batch policy decides when the big model runs, not what it writes
    assert pair_fingerprint(repoliced, bild, digest) == pair_fingerprint(spec, bild, digest)
    for decoding in (big, bild):
        assert pair_fingerprint(longer, decoding, digest) != pair_fingerprint(spec, decoding, digest)
    assert set(pair_fingerprint(spec, big, digest)) == {"pair.json", "dict.de.txt", "dict.en.txt", "big.pt",
                                                         "bpe.codes"}


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in the worker catches it."""


@pytest.fixture
def shard_run(tmp_path, monkeypatch):
    """A one-shard work directory of 10 lines (chunks of 4), whose worker gets the translator the
    test sets in ``translators`` (one per attempt)."""
    from bild_fairseq import api

    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i}\n" for i in range(10)))
    wd = WorkDir(tmp_path / "work")
    wd.create()
    cfg = _config(input=str(src), lines=10, shards=1, device="cpu", chunk_lines=4)
    cfg.save(wd.config)
    translators: list = []
    monkeypatch.setattr(api.PairTranslator, "from_pair_dir", classmethod(lambda cls, *a, **k: translators.pop(0)))
    return wd, cfg, translators


def test_a_rerun_continues_after_the_last_published_chunk(shard_run):
    wd, cfg, translators = shard_run

    class DiesOnThirdCall(_FakeTranslator):
        def translate(self, lines, **kwargs):
            if self.calls == 2:
                raise _Killed
            return super().translate(lines, **kwargs)

    translators += [DiesOnThirdCall(), _FakeTranslator()]
    with pytest.raises(_Killed):
        run_shard(wd, 0, None)
    assert not wd.output(0).exists() and sorted(p.name for p in wd.parts(0).iterdir()) == \
        ["000000000.json", "000000000.out", "000000004.json", "000000004.out"]
    record = run_shard(wd, 0, None)
    assert record.status == "done" and record.resumed_lines == 8 and translators == []
    assert wd.output(0).read_text() == "".join(f"LINE {i}\n" for i in range(10))
    assert record.stats["sentences"] == 10 and not wd.parts(0).exists() and wd.damage(0, cfg.hash) is None


def test_a_worker_of_a_replaced_run_publishes_nothing(shard_run):
    """``--fresh`` replaced the configuration while the worker decoded: its result would mix runs."""
    wd, cfg, translators = shard_run

    class FreshRunStarts(_FakeTranslator):
        def translate(self, lines, **kwargs):
            newer = _config(input=cfg.input, lines=10, shards=1, decoding=Decoding(fallback_threshold=0.1))
            newer.save(wd.config)
            wd.queue(0, range(0, 10), newer.hash)
            return super().translate(lines, **kwargs)

    translators.append(FreshRunStarts())
    record = run_shard(wd, 0, None)
    assert record.status == "failed" and "configuration changed while this worker decoded" in record.error
    assert not wd.output(0).exists() and not list(wd.parts(0).glob("*"))
    assert wd.read_record(0).status == "queued" and wd.read_record(0).config_hash != cfg.hash


def test_the_records_checksum_is_of_the_bytes_the_worker_wrote(shard_run, monkeypatch):
    """Another writer that replaces the output right after the rename is caught, not vouched for."""
    import jobs.workdir

    wd, cfg, translators = shard_run
    translators.append(_FakeTranslator())
    real_replace = os.replace

    def replace_then_overwrite(src, dst):
        real_replace(src, dst)
        if Path(dst) == wd.output(0):
            Path(dst).write_text("a stale worker's lines\n" * 10)

    monkeypatch.setattr(jobs.workdir.os, "replace", replace_then_overwrite)
    assert run_shard(wd, 0, None).status == "done"
    assert "was changed after the worker wrote it" in wd.damage(0, cfg.hash)


def test_an_environment_fault_fails_the_shard_for_a_retry_without_charging_lines(shard_run):
    wd, cfg, translators = shard_run
    translators.append(_FakeTranslator({2: OSError(5, "Input/output error")}))
    record = run_shard(wd, 0, None)
    assert record.status == "failed" and record.retryable and "Input/output error" in record.error
    assert record.issues == [] and not wd.output(0).exists()
    assert [p.name for p in wd.parts(0).glob("*.json")] == ["000000000.json"]  # kept for the retry


def test_a_slurm_task_whose_result_shows_late_is_not_declared_failed(shard_run):
    """On NFS the driver may see a finished task's record late: it looks again after a grace
    period, and never writes "failed" over a record that says done."""
    import threading

    from jobs.executors.base import Ended
    from jobs.executors.slurm import POLL_INTERVAL_S
    from jobs.runner import settle

    wd, cfg, _ = shard_run
    record = wd.queue(0, range(0, 10), cfg.hash)
    record.status = "running"
    wd.write_record(record)

    def worker_result_arrives() -> None:
        wd.output(0).write_text("x\n" * 10)
        record.status = "done"
        wd.write_record(record)

    threading.Timer(0.2, worker_result_arrives).start()
    ended = Ended(0, None, "Slurm array task 1_0 ended")
    assert settle(wd, cfg, [ended], grace_s=1.0) == [(ended, None)]
    assert wd.read_record(0).status == "done"
    wd.output(0).unlink()  # the record is visible, its output not yet
    (_, failure), = settle(wd, cfg, [ended], grace_s=0)
    assert "its record says done, but its output" in failure.reason and wd.read_record(0).status == "done"
    executor = SlurmExecutor(wd, ["python"], SlurmOptions(), job_name="x")
    assert executor.poll_interval_s == executor.settle_grace_s == POLL_INTERVAL_S == 30


def test_a_bild_option_says_it_implied_bild_not_that_the_pair_chose_it(tiny_pair):
    from dataclasses import replace

    from bild_fairseq.pairdir import PairSpec
    from jobs.runner import mode_note

    spec = replace(PairSpec.load(tiny_pair), run={"mode": "big", "why": "BiLD measured 0.65x big-only"})
    given = Decoding(fallback_threshold=0.5)
    note = mode_note(given, given.resolve(spec), spec)
    assert note == ("mode: --bild, implied by the BiLD option(s) given; the pair's measured default is --big-only "
                    "(BiLD measured 0.65x big-only)")
    assert mode_note(Decoding(), Decoding().resolve(spec), spec).startswith("mode: --big-only, the pair's measured")
    assert mode_note(Decoding(mode="bild"), Decoding(mode="bild"), spec) is None


def test_a_changed_mode_lists_only_real_changes(tiny_pair, tmp_path):
    """Another mode reads other pair files and settings: not a change of the pair."""
    import shutil

    from bild_fairseq.pairdir import PairSpec
    from jobs.runner import ConfigChanged, RunRequest, plan_run

    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair, pair)
    src = tmp_path / "in.de"
    src.write_text("Klicken Sie auf OK.\n")
    wd = WorkDir(tmp_path / "work")
    wd.root.mkdir()
    spec = PairSpec.load(pair)

    def plan(mode: str) -> None:
        request = RunRequest(input=src, pair_dir=pair, output=tmp_path / "o.en", decoding=Decoding(mode=mode))
        plan_run(wd, request, spec, False, print)

    plan("bild")
    with pytest.raises(ConfigChanged) as changed:
        plan("big")
    assert "decoding.mode: 'bild' -> 'big'" in str(changed.value) and "pair_fingerprint" not in str(changed.value)
    (pair / "small.pt").unlink()  # a file the earlier run read is gone: that is a change
    with pytest.raises(ConfigChanged) as changed:
        plan("big")
    assert "pair_fingerprint.small.pt: '" in str(changed.value) and "' -> None" in str(changed.value)
    assert "pair_fingerprint.pair.json" not in str(changed.value)
