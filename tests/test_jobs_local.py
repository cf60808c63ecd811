"""The local executor end to end: real corpus lines, a real (tiny, random) pair, real worker
processes started by the ``bild-jobs`` console script."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.workdir import WorkDir
from jobs_fixtures import BILD_JOBS, CORPUS, ROOT, bild_jobs, read_output, real_lines, translate_in_process

pytest_plugins = ["jobs_fixtures"]


def test_three_cpu_workers_reproduce_a_single_process_run(tiny_pair, corpus, reference_output, tmp_path):
    src, ref = corpus
    out = tmp_path / "out.en"
    done = bild_jobs("run", src, "--pair", tiny_pair, "-o", out, "--workers", "3", "--shards", "3",
                     "--device", "cpu", "--ref", ref)
    assert done.returncode == 0, done.stderr
    assert read_output(out) == reference_output

    m = json.loads((tmp_path / "out.en.work" / "manifest.json").read_text())
    assert [(s["start"], s["stop"], s["status"], s["attempt"]) for s in m["shards"]] == \
        [(0, 100, "done", 1), (100, 200, "done", 1), (200, 300, "done", 1)]
    assert m["executor"] == {"name": "local", "workers": 3}
    totals = m["totals"]
    assert totals["lines"] == totals["lines_done"] == 300
    assert totals["stats"]["sentences"] == 300 == sum(s["stats"]["sentences"] for s in m["shards"])
    assert totals["stats"]["tokens"] == totals["stats"]["big_tokens"] + totals["stats"]["small_tokens"] > 0
    assert totals["wall_seconds"] > 0 and totals["lines_per_second"] > 0
    assert {s["name"] for s in m["scores"]} == {"BLEU", "chrF"}
    assert all("version:" in s["signature"] for s in m["scores"])
    assert "BLEU = " in done.stdout and "nrefs:1" in done.stdout
    assert len({json.dumps(u) for u in m["decoding"]["used"]}) == 1

    # the same command again: everything is done, nothing is recomputed
    mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "out.en.work" / "shards").glob("*.out"))]
    again = bild_jobs("run", src, "--pair", tiny_pair, "-o", out, "--workers", "3", "--shards", "3",
                      "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert "3 done, 0 to run" in again.stderr
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "out.en.work" / "shards").glob("*.out"))] == mtimes
    assert read_output(out) == reference_output


def _wait_for_worker_mid_shard(wd: WorkDir, shards: range, driver: subprocess.Popen, timeout: float = 120) -> int:
    """The shard whose worker has published a chunk but not finished; returns its index."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()
        for i in shards:
            record = wd.read_record(i)
            if record and record.status == "running" and list(wd.parts(i).glob("*.json")):
                return i
        time.sleep(0.02)
    raise AssertionError("no worker was seen mid-shard")


def test_kill9_worker_mid_shard_then_rerun_continues_after_its_last_chunk(tiny_pair, corpus, reference_output,
                                                                         tmp_path):
    src, _ = corpus
    out, wd = tmp_path / "out.en", WorkDir(tmp_path / "work")
    # small chunks: the worker publishes its first lines long before the shard ends
    cmd = [str(BILD_JOBS), "run", str(src), "--pair", str(tiny_pair), "-o", str(out), "-w", str(wd.root),
           "--workers", "2", "--shards", "2", "--device", "cpu", "--chunk-lines", "20", "--retries", "0"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = _wait_for_worker_mid_shard(wd, range(2), driver)
    os.kill(wd.read_record(victim).pid, signal.SIGKILL)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 1
    assert f"shard {victim} " in stderr and "killed by SIGKILL" in stderr and str(wd.local_log(victim, 1)) in stderr
    assert not out.exists()  # no partial output
    assert not wd.output(victim).exists()
    killed = wd.read_record(victim)
    assert killed.status == "failed" and "SIGKILL" in killed.error

    others = [i for i in range(2) if i != victim]
    before = {i: (wd.output(i).stat().st_mtime_ns, wd.read_record(i).attempt) for i in others}
    assert all(wd.is_done(i, killed.config_hash) for i in others)
    table = CliRunner().invoke(main, ["status", str(wd.root)]).output
    assert "1 done, 0 running, 0 pending, 1 failed; 150/300 lines done" in table
    assert "killed by SIGKILL" in table
    incomplete = CliRunner().invoke(main, ["collect", str(wd.root)])
    assert incomplete.exit_code == 1 and f"1 of 2 shard(s) are not done (shards {victim})" in incomplete.output
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 done, 1 to run" in rerun.stderr
    assert {i: (wd.output(i).stat().st_mtime_ns, wd.read_record(i).attempt) for i in others} == before
    assert wd.read_record(victim).attempt == 2
    assert wd.read_record(victim).resumed_lines >= 20  # the published chunks were not decoded again
    assert "resuming after its first" in wd.local_log(victim, 2).read_text()
    assert read_output(out) == reference_output  # complete, nothing duplicated or reordered
    assert not wd.parts(victim).exists()
    assert not list(wd.shards.glob(".*.tmp"))
    again = CliRunner().invoke(main, ["collect", str(wd.root), "-o", str(tmp_path / "again.en")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again.en").read_bytes() == out.read_bytes()
    assert json.loads(wd.manifest.read_text())["output"] == str(tmp_path / "again.en")


def test_bad_input_lines_are_counted_reported_and_never_dropped(tiny_pair, tmp_path):
    long_line = " ".join(["Hilfe"] * 5000).encode()
    lines = [b"Klicken Sie auf OK.", b"", b"   ", long_line, b"Ung\xfcltig: \xff\xfe Bytes", b"Windows-Zeile\r",
             b"Mit \x00 NUL", b"Die letzte Zeile ohne Zeilenende"]
    src = tmp_path / "bad.de"
    src.write_bytes(b"\n".join(lines))
    out = tmp_path / "bad.en"
    done = bild_jobs("run", src, "--pair", tiny_pair, "-o", out, "--shards", "2", "--workers", "2",
                     "--device", "cpu")
    assert done.returncode == 0, done.stderr

    hyps = read_output(out)
    assert len(hyps) == len(lines)
    assert hyps[1] == hyps[2] == ""
    texts = [line.decode("utf-8", errors="replace").rstrip("\r") for line in lines]
    assert hyps == translate_in_process(tiny_pair, texts)

    m = json.loads((tmp_path / "bad.en.work" / "manifest.json").read_text())
    assert m["totals"]["issues"] == {"empty": 2, "truncated": 1, "invalid_utf8": 1, "nul_byte": 1}
    assert m["totals"]["shards"] == {"done": 2}
    issues = (tmp_path / "bad.en.work" / "issues.tsv").read_text().splitlines()
    assert issues[0] == "line\tkind\tdetail"
    assert [row.split("\t")[:2] for row in issues[1:]] == [["2", "empty"], ["3", "empty"], ["4", "truncated"],
                                                          ["5", "invalid_utf8"], ["7", "nul_byte"]]
    assert "2 empty" in done.stdout and "1 invalid_utf8" in done.stdout and "1 truncated" in done.stdout


def test_unusable_requests_are_clear_errors_before_any_work(tiny_pair, corpus, tmp_path):
    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair, pair)
    (pair / "small.pt").unlink()
    result = CliRunner().invoke(main, ["run", str(corpus[0]), "--pair", str(pair), "-o", str(tmp_path / "o.en"),
                                       "--device", "cpu"])
    assert result.exit_code == 1
    assert f"pair directory {pair}: missing small.pt" in result.output
    assert not (tmp_path / "o.en.work").exists()
    result = CliRunner().invoke(main, ["run", str(corpus[0]), "--pair", str(pair), "-o", str(tmp_path / "o.en"),
                                       "--small-only", "--small-checkpoint", "small-aligned.pt", "--device", "cpu"])
    assert result.exit_code == 1 and "missing small-aligned.pt" in result.output
    result = CliRunner().invoke(main, ["run", str(corpus[0]), "--pair", str(tiny_pair), "-o", str(corpus[0])])
    assert result.exit_code == 2 and "is the input file" in result.output
    result = CliRunner().invoke(main, ["run", str(corpus[0]), "--pair", str(tiny_pair), "-o", str(tmp_path / "o.en"),
                                       "--fallback-threshold", "2"])
    assert result.exit_code == 2 and "must be in [0, 1]" in result.output
    result = CliRunner().invoke(main, ["run", str(corpus[0]), "--pair", str(tiny_pair), "-o", str(tmp_path / "o.en"),
                                       "--gpus-per-task", "1", "--dry-run"])
    assert result.exit_code == 2 and "--gpus-per-task, --dry-run: Slurm options" in result.output
    assert not (tmp_path / "o.en.work").exists()

    short_ref = tmp_path / "short.en"
    short_ref.write_text("only\nfive\nlines\nof\nreference\n")
    result = CliRunner().invoke(main, ["run", str(corpus[0]), "--pair", str(tiny_pair), "-o", str(tmp_path / "r.en"),
                                       "--ref", str(short_ref), "--device", "cpu"])
    assert result.exit_code == 1 and "has 5 lines, the input has 300" in result.output
    assert not list((tmp_path / "r.en.work" / "shards").iterdir())  # refused before decoding


def test_input_that_is_not_text_is_refused_unless_insisted(tiny_pair, tmp_path):
    program = tmp_path / "ls"
    program.write_bytes(Path("/bin/ls").read_bytes())
    args = ["run", str(program), "--pair", str(tiny_pair), "-o", str(tmp_path / "o.en"), "--device", "cpu"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and f"{program} does not look like text: " in refused.output
    assert "NUL bytes or invalid UTF-8 (limit 5%)" in refused.output and "--allow-binary" in refused.output
    assert not (tmp_path / "o.en.work").exists()
    insisted = CliRunner().invoke(main, [*args, "--allow-binary", "--executor", "slurm", "--dry-run"])
    assert insisted.exit_code == 0, insisted.output  # planned, not refused


def test_changed_config_is_refused_unless_fresh(tiny_pair, tmp_path):
    src = tmp_path / "in.de"
    src.write_text("Klicken Sie auf OK.\n")
    out = tmp_path / "o.en"
    args = ["run", str(src), "--pair", str(tiny_pair), "-o", str(out), "--workers", "1", "--device", "cpu"]
    first = CliRunner().invoke(main, [*args, "--shards", "3"])
    assert first.exit_code == 0, first.output
    assert "3 shards requested for 1 input lines: using 1" in first.output
    old_hash = json.loads((tmp_path / "o.en.work" / "config.json").read_text())["hash"]

    changed = CliRunner().invoke(main, [*args, "--fallback-threshold", "0.3"])
    assert changed.exit_code == 1
    assert "decoding.fallback_threshold: None -> 0.3" in changed.output and "--fresh" in changed.output
    assert json.loads((tmp_path / "o.en.work" / "config.json").read_text())["hash"] == old_hash

    # batch size and worker count are not part of the hash: resume as is
    same = CliRunner().invoke(main, [*args, "--max-tokens", "64"])
    assert same.exit_code == 0 and "1 done, 0 to run" in same.output
    # nor is the BiLD batch policy (it decides when the big model runs, not what it writes)
    same = CliRunner().invoke(main, [*args, "--wait-share", "1", "--verify-drafting"])
    assert same.exit_code == 0 and "1 done, 0 to run" in same.output

    fresh = CliRunner().invoke(main, [*args, "--fallback-threshold", "0.3", "--fresh"])
    assert fresh.exit_code == 0, fresh.output
    cfg = json.loads((tmp_path / "o.en.work" / "config.json").read_text())
    assert cfg["hash"] != old_hash and cfg["decoding"]["fallback_threshold"] == 0.3
    assert WorkDir(tmp_path / "o.en.work").read_record(0).attempt == 1
    assert len(read_output(out)) == 1


def test_summarization_is_scored_with_rouge(tiny_summ_pair, tmp_path):
    docs = real_lines(ROOT / "data" / "corpora" / "debdesc.test.src.xz", 6)
    refs = real_lines(ROOT / "data" / "corpora" / "debdesc.test.tgt.xz", 6)
    src, ref = tmp_path / "docs.txt", tmp_path / "ref.txt"
    src.write_bytes(b"\n".join(docs) + b"\n")
    ref.write_bytes(b"\n".join(refs) + b"\n")
    result = CliRunner().invoke(main, ["run", str(src), "--pair", str(tiny_summ_pair), "-o", str(tmp_path / "s.txt"),
                                       "--workers", "1", "--device", "cpu", "--ref", str(ref)])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "s.txt.work" / "manifest.json").read_text())
    assert [s["name"] for s in m["scores"]] == ["ROUGE-1", "ROUGE-2", "ROUGE-L"]
    assert m["task"] == "summarization" and len(read_output(tmp_path / "s.txt")) == 6


def _drop_last_newline(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _swap_first_lines(path: Path) -> None:
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[1], lines[0], *lines[2:]]))


def _replace_a_line(path: Path) -> None:
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([b"something else", *lines[1:]]))


@pytest.mark.parametrize("damage, file, why", [
    (_drop_last_newline, "out", "was changed after the worker wrote it (3 lines"),
    (_swap_first_lines, "out", "was changed after the worker wrote it (4 lines"),
    (_replace_a_line, "out", "was changed after the worker wrote it (4 lines"),
    (lambda p: p.unlink(), "out", "is missing"),
    (lambda p: p.write_text(""), "json", "is unreadable (JSONDecodeError)"),
])
def test_a_damaged_shard_is_told_apart_by_its_record(tmp_path, damage, file, why):
    """A done shard's output must still have the line count and checksum its worker recorded."""
    from jobs.workdir import ShardRecord, count_and_hash

    wd = WorkDir(tmp_path / "w")
    wd.create()
    wd.output(1).write_bytes(b"one\ntwo\nthree\nfour\n")
    lines, sha = count_and_hash(wd.output(1))
    wd.write_record(ShardRecord(1, 4, 8, "cfg", "done", 1, output_lines=lines, output_sha256=sha))
    assert wd.damage(1, "cfg") is None and wd.damage(1, "other config") is None  # another run's shard: not ours
    target = wd.output(1) if file == "out" else wd.record_path(1)
    damage(target)
    assert wd.damage(1, "cfg").startswith(f"its {'output' if file == 'out' else 'record'} {target} {why}")


def test_a_damaged_shard_is_named_never_collected_and_recomputed(tiny_pair, tmp_path):
    src = tmp_path / "in.de"
    src.write_bytes(b"".join(line + b"\n" for line in real_lines(CORPUS, 12)))
    out = tmp_path / "o.en"
    args = ["run", str(src), "--pair", str(tiny_pair), "-o", str(out), "--workers", "1", "--device", "cpu",
            "--shards", "3"]
    assert CliRunner().invoke(main, args).exit_code == 0
    clean = out.read_bytes()
    wd = WorkDir(tmp_path / "o.en.work")
    _swap_first_lines(wd.output(1))

    collected = CliRunner().invoke(main, ["collect", str(wd.root)])
    assert collected.exit_code == 1 and "Traceback" not in collected.output
    assert f"shard 1: its output {wd.output(1)} was changed" in collected.output
    assert "not collected" in collected.output and out.read_bytes() == clean
    status = CliRunner().invoke(main, ["status", str(wd.root)])
    assert status.exit_code == 0 and "1 damaged" in status.output

    rerun = CliRunner().invoke(main, args)
    assert rerun.exit_code == 0, rerun.output
    assert "shard 1: its" in rerun.output and "recomputing it" in rerun.output
    assert "2 done, 1 to run" in rerun.output
    assert out.read_bytes() == clean


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A mounter of small tmpfs file systems (root only), unmounted after the test."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)]).returncode != 0:
            pytest.skip("this machine does not allow mounting a tmpfs")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)])


def test_output_problems_are_one_clear_line(tiny_pair, corpus, tmp_path, tiny_tmpfs):
    def run(output: Path, workdir: str = "w"):
        return CliRunner().invoke(main, ["run", str(corpus[0]), "--pair", str(tiny_pair), "-o", str(output),
                                         "--workdir", str(tmp_path / workdir), "--workers", "1", "--device", "cpu"])

    as_directory = run(tmp_path)
    assert as_directory.exit_code == 2 and f"--output {tmp_path} is a directory" in as_directory.output

    read_only = tiny_tmpfs("ro", "ro,size=64k")
    refused = run(read_only / "o.en", "w-ro")
    assert refused.exit_code == 2 and "Read-only file system" in refused.output
    assert f"cannot write in {read_only}" in refused.output
    assert not (tmp_path / "w-ro").exists()  # refused before any work

    full = tiny_tmpfs("full", "size=8k")  # the 300 output lines do not fit
    failed = run(full / "o.en")
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    assert "No space left on device: free space or fix permissions" in failed.output
    assert f"{full}/" in failed.output  # names the file it could not write
    done = run(tmp_path / "o.en")  # the decoded shards were kept: only the output is written
    assert done.exit_code == 0 and "1 done, 0 to run" in done.output, done.output
    assert "nothing decoded in this run" in done.output


def test_two_runs_may_not_write_one_output(tiny_pair, tmp_path):
    from jobs.workdir import exclusive

    src = tmp_path / "in.de"
    src.write_text("Klicken Sie auf OK.\n")
    out = tmp_path / "o.en"
    with exclusive(out.with_name(f".{out.name}.lock"), "held by the test"):
        second = CliRunner().invoke(main, ["run", str(src), "--pair", str(tiny_pair), "-o", str(out),
                                           "--workdir", str(tmp_path / "other.work"), "--device", "cpu"])
    assert second.exit_code == 1 and f"the output {out} is in use by another bild-jobs process" in second.output


def test_a_local_worker_dies_with_its_driver_without_preexec_fn(tmp_path, monkeypatch):
    """The parent-death signal is armed in the worker itself: ``preexec_fn`` runs Python between
    fork and exec, a deadlock hazard in a driver with threads (tqdm, torch)."""
    from jobs.executors.local import LocalExecutor

    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kwargs: started.append((cmd, kwargs)))
    wd = WorkDir(tmp_path / "w")
    wd.create()
    wd.queue(0, range(0, 1), "h")
    LocalExecutor(wd, ["python"], [{}]).submit([0])
    (cmd, kwargs), = started
    assert "preexec_fn" not in kwargs and cmd[-2:] == ["--die-with", str(os.getpid())]
    monkeypatch.undo()

    middle = subprocess.Popen(["sh", "-c", f"{sys.executable} -c 'import os, time; from jobs.worker import die_with; "
                               "die_with(os.getppid()); print(os.getpid(), flush=True); time.sleep(60)' & wait"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    worker = int(middle.stdout.readline())
    middle.kill()
    middle.wait()
    deadline = time.monotonic() + 20
    while _alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:  # a zombie is dead: this container's init may reap it late
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_precision_reaches_both_models_and_the_manifest_and_fp16_on_cpu_is_refused(tiny_pair, tmp_path):
    """--precision bf16: the workers decode in bf16 (what they record having used) and the
    manifest says so; fp16 on the CPU, as --precision or as the older --fp16, is one line."""
    src = tmp_path / "in.de"
    src.write_bytes(b"".join(line + b"\n" for line in real_lines(CORPUS, 12)))
    args = ["run", str(src), "--pair", str(tiny_pair), "-o", str(tmp_path / "out.en"), "--workers", "1",
            "--device", "cpu", "--bild-exact"]
    for fp16 in (["--precision", "fp16"], ["--fp16"]):
        refused = CliRunner().invoke(main, [*args, *fp16])
        assert refused.exit_code == 2 and "fp16 needs a GPU (asked on cpu): on the CPU use bf16 or fp32" in refused.output
    both = CliRunner().invoke(main, [*args, "--fp16", "--precision", "bf16"])
    assert both.exit_code == 2 and "--fp16 is --precision fp16, and --precision bf16 was given too: give one" in both.output
    assert not (tmp_path / "out.en.work").exists()
    done = bild_jobs(*args, "--precision", "bf16")
    assert done.returncode == 0, done.stderr
    m = json.loads((tmp_path / "out.en.work" / "manifest.json").read_text())
    assert m["decoding"]["requested"]["precision"] == "bf16"
    assert [(u["precision"], u["engine"], u["mode"]) for u in m["decoding"]["used"]] == [("bf16", "torch", "bild")]
    assert len(read_output(tmp_path / "out.en")) == 12


def test_max_tokens_defaults_by_the_workers_device(tiny_pair, tmp_path):
    """4096 source tokens per batch on CPU workers, 16384 where the workers get a GPU; given, as given."""
    src = tmp_path / "in.de"
    src.write_bytes(b"".join(line + b"\n" for line in real_lines(CORPUS, 3)))
    for extra, want in (([], 4096), (["--gpus-per-task", "1"], 16384), (["--gpus-per-task", "1", "--max-tokens", "999"], 999)):
        wd = tmp_path / f"w{want}"
        result = CliRunner().invoke(main, ["run", str(src), "--pair", str(tiny_pair), "-o", str(tmp_path / "o.en"),
                                           "--workdir", str(wd), "--executor", "slurm", "--dry-run", *extra])
        assert result.exit_code == 0, result.output
        assert json.loads((wd / "config.json").read_text())["max_tokens"] == want
