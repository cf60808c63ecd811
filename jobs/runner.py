"""The driver: plan a run in its work directory, run missing shards with retries, report.

Whatever the executor, a shard counts as done only through its record and output file (see
jobs.workdir), so rerunning the same command redoes exactly the shards that are not done.
"""
from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from bild_fairseq.pairdir import PairSpec
from jobs import manifest
from jobs.collect import check_reference, collect
from jobs.config import ConfigError, Decoding, RunConfig, pair_fingerprint
from jobs.executors.base import Ended, Executor
from jobs.executors.slurm import live_tasks
from jobs.shards import MAX_NOT_TEXT_SHARE, not_text_share, scan
from jobs.workdir import WorkDir, exclusive, sha256_file

LINES_PER_SHARD = 100_000  # default shard size: minutes of work each, cheap to redo


class ConfigChanged(RuntimeError):
    """The work directory holds a run with another configuration."""


class RunFailed(RuntimeError):
    """Shards still failed after their retries; the message lists them with their logs."""


@dataclass(frozen=True)
class RunRequest:
    input: Path
    pair_dir: Path
    output: Path
    decoding: Decoding
    shards: int | None = None
    parallel: int | None = None  # workers: sizes the default shard count
    max_tokens: int = 4096
    max_sentences: int | None = None
    device: str = "auto"
    chunk_lines: int = 500
    allow_binary: bool = False  # decode input that does not look like text


def check_writable(directory: Path, what: str) -> None:
    """Fail now, not after hours of decoding, when ``directory`` cannot take a new file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ConfigError(f"{what}: cannot write in {directory} ({e.strerror}): choose a writable location") from None


MODE_FLAGS = {"bild": "--bild", "big": "--big-only", "small": "--small-only"}


def mode_note(given: Decoding, resolved: Decoding, spec: PairSpec) -> str | None:
    """The line that says who chose the mode, and why (None when the user chose it)."""
    default = spec.run.get("mode", "bild")
    if given.mode is None and given.bild_given() and default != "bild":
        return (f"mode: --bild, implied by the BiLD option(s) given; the pair's measured default is "
                f"{MODE_FLAGS[default]}" + (f" ({spec.run['why']})" if "why" in spec.run else ""))
    if given.mode is not None or "why" not in spec.run:
        return None
    engine = "" if given.engine is not None or resolved.engine == "torch" else \
        f" on --engine {resolved.engine}{' --int8' if resolved.int8 else ''}"
    return (f"mode: {MODE_FLAGS[resolved.mode]}{engine}, the pair's measured default: {spec.run['why']}; "
            "give --bild or --big-only (and --engine) to choose")


def check_request(req: RunRequest, echo: Callable[[str], None] | None = None) -> tuple[RunRequest, PairSpec]:
    """Everything that can be refused without touching the work directory or reading more than
    the input's first MiB; returns the request with its decoding mode resolved (``echo`` says
    when the pair chose it)."""
    if req.output.resolve() == req.input.resolve():
        raise ConfigError(f"--output {req.output} is the input file: choose another output path")
    if not req.allow_binary and (share := not_text_share(req.input)) > MAX_NOT_TEXT_SHARE:
        raise ConfigError(f"{req.input} does not look like text: {share:.0%} of its first MiB are NUL bytes or "
                          f"invalid UTF-8 (limit {MAX_NOT_TEXT_SHARE:.0%}); give a text file, or --allow-binary "
                          "to decode it anyway")
    if req.output.is_dir():
        raise ConfigError(f"--output {req.output} is a directory: give the output file's path, e.g. {req.output}/out.txt")
    check_writable(req.output.parent, f"--output {req.output}")
    spec = PairSpec.load(req.pair_dir)
    decoding = req.decoding.resolve(spec)
    if echo is not None and (note := mode_note(req.decoding, decoding, spec)):
        echo(note)
    decoding.check_pair(spec)
    return replace(req, decoding=decoding), spec


def plan_run(wd: WorkDir, req: RunRequest, spec: PairSpec, fresh: bool, echo: Callable[[str], None]) -> RunConfig:
    """Scan the input, and create or resume the work directory's configuration."""
    corpus = wd.cached("corpus", req.input, lambda p: asdict(scan(p)))
    previous = RunConfig.load(wd.config) if wd.config.is_file() else None
    digest = lambda p: wd.cached("sha256", p, sha256_file)  # noqa: E731
    shards = req.shards or (previous.shards if previous else None) \
        or max(req.parallel or 1, math.ceil(corpus["lines"] / LINES_PER_SHARD))
    if shards > max(corpus["lines"], 1):
        echo(f"note: {shards} shards requested for {corpus['lines']} input lines: using {max(corpus['lines'], 1)}")
        shards = max(corpus["lines"], 1)
    cfg = RunConfig(input=str(req.input.absolute()), input_sha256=corpus["sha256"], lines=corpus["lines"],
                    shards=shards, pair_dir=str(req.pair_dir.absolute()), task=spec.task,
                    pair_fingerprint=pair_fingerprint(spec, req.decoding, digest),
                    decoding=req.decoding.canonical(spec), output=str(req.output.absolute()), max_tokens=req.max_tokens,
                    max_sentences=req.max_sentences, device=req.device, chunk_lines=req.chunk_lines)
    if previous is not None and previous.hash != cfg.hash:
        if not fresh:
            changes = "\n  ".join(_changes(previous, cfg, spec, digest))
            raise ConfigChanged(f"{wd.root} holds a run with another configuration:\n  {changes}\n"
                                "Rerun with --fresh to discard its results and start over, "
                                "or give another --workdir.")
        if tasks := live_tasks(wd):  # they would read the new config.json and write into shards/
            jobs = " ".join(sorted({t.split("_")[0] for t in tasks}))
            raise ConfigChanged(f"--fresh: {wd.root} has Slurm tasks of its earlier run still queued or running "
                                f"({', '.join(tasks)}): `scancel {jobs}` or wait for them, then rerun")
        echo(f"--fresh: discarding the results in {wd.root} (config {previous.hash})")
        wd.clear()
    wd.create()
    cfg.save(wd.config)
    return cfg


def _changes(previous: RunConfig, cfg: RunConfig, spec: PairSpec, digest: Callable[[Path], str]) -> list[str]:
    """What really changed: the pair's files and pair.json compared under the earlier decoding
    (another mode reads other files and settings, which is not a change of the pair), then the rest."""
    now = pair_fingerprint(spec, previous.decoding, lambda p: digest(p) if p.is_file() else None)  # None: gone
    then = replace(previous, pair_fingerprint=now)
    same_pair = replace(previous, pair_fingerprint=cfg.pair_fingerprint)
    return then.differences(previous) + cfg.differences(same_pair)


@dataclass
class Failure:
    shard: int
    reason: str
    log: Path | None
    retryable: bool = True


def settle(wd: WorkDir, cfg: RunConfig, ended: list[Ended], grace_s: float) -> list[tuple[Ended, Failure | None]]:
    """How each ended worker ended. Those without a visible result are looked at again after
    ``grace_s``: on a shared filesystem a finished worker's record may show late."""
    if grace_s and any(not wd.is_done(e.shard, cfg.hash) for e in ended):
        time.sleep(grace_s)
    return [(e, _settle(wd, cfg, e)) for e in ended]


def _settle(wd: WorkDir, cfg: RunConfig, ended: Ended) -> Failure | None:
    """Decide how a worker ended; one that died without reporting gets its record marked failed
    (never one whose record says done: its output may be on its way)."""
    if wd.is_done(ended.shard, cfg.hash):
        return None
    record = wd.read_record(ended.shard)
    if record is not None and record.config_hash == cfg.hash and record.status == "failed":
        return Failure(ended.shard, record.error or ended.reason, Path(record.log) if record.log else ended.log,
                       record.retryable)
    if record is not None and record.config_hash == cfg.hash and record.status == "done":
        return Failure(ended.shard, f"its record says done, but its output {wd.output(ended.shard)} is missing",
                       ended.log)
    reason = f"{ended.reason} without a result"
    if ended.log is not None and ended.log.is_file():
        last = ended.log.read_text(errors="replace").strip().splitlines()[-1:]
        reason += f"; its log ends: {last[0]}" if last else "; its log is empty"
    if record is None or record.config_hash != cfg.hash:  # a job script submitted by hand (--dry-run)
        record = wd.queue(ended.shard, cfg.ranges()[ended.shard], cfg.hash)
    record.status, record.error, record.finished = "failed", reason, time.time()
    record.log = record.log or (str(ended.log) if ended.log else None)
    wd.write_record(record)
    return Failure(ended.shard, reason, ended.log)


class Progress:
    """tqdm over input lines: finished shards plus what running workers report."""

    def __init__(self, wd: WorkDir, cfg: RunConfig, enabled: bool):
        self.wd, self.cfg = wd, cfg
        self.bar = tqdm(total=cfg.lines, initial=self._done(), unit="line", dynamic_ncols=True,
                        disable=not enabled, desc="decoding")

    def _done(self) -> int:
        return sum(len(r) for i, r in enumerate(self.cfg.ranges()) if self.wd.is_done(i, self.cfg.hash))

    def refresh(self, running: list[int]) -> None:
        n = self._done() + sum(self.wd.lines_in_progress(i) for i in running)
        self.bar.update(max(0, n - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def _submit(wd: WorkDir, cfg: RunConfig, executor: Executor, shards: list[int]) -> None:
    ranges = cfg.ranges()
    for i in shards:
        wd.queue(i, ranges[i], cfg.hash)
    executor.submit(shards)


def execute(wd: WorkDir, cfg: RunConfig, executor: Executor, retries: int, echo: Callable[[str], None],
            progress: bool, executor_info: dict) -> list[Failure]:
    """Run every shard that is not done, retrying failures up to ``retries`` times each;
    returns the shards that still failed. Keeps the manifest current as shards end."""
    in_flight = executor.attach()
    for i in range(cfg.shards):
        problem = None if i in in_flight else wd.damage(i, cfg.hash)
        if problem:
            echo(f"shard {i}: {problem}: recomputing it")
            wd.discard(i)
    todo = [i for i in range(cfg.shards) if not wd.is_done(i, cfg.hash) and i not in in_flight]
    done_before = cfg.shards - len(todo) - len(in_flight)
    echo(f"{cfg.shards} shard(s) over {cfg.lines} lines: {done_before} done, {len(todo)} to run"
         + (f", {len(in_flight)} still in Slurm" if in_flight else "") + f" ({executor.name} executor)")
    tries: Counter[int] = Counter(todo + in_flight)
    failures: dict[int, Failure] = {}
    bar = Progress(wd, cfg, progress)
    if todo:
        _submit(wd, cfg, executor, todo)
    manifest.write(wd, manifest.build(wd, cfg, executor=executor_info))
    try:
        while executor.active():
            time.sleep(executor.poll_interval_s)
            retry = []
            ended = executor.poll()
            for e, failure in settle(wd, cfg, ended, executor.settle_grace_s):
                if failure is None:
                    continue
                if tries[e.shard] <= retries and failure.retryable:
                    echo(f"shard {e.shard} failed ({failure.reason}); retry {tries[e.shard]} of {retries}")
                    retry.append(e.shard)
                else:
                    failures[e.shard] = failure
            if retry:
                tries.update(retry)
                _submit(wd, cfg, executor, retry)
            if ended:
                manifest.write(wd, manifest.build(wd, cfg, executor=executor_info))
            bar.refresh(executor.active())
    except KeyboardInterrupt:
        bar.close()
        echo(f"interrupted: {executor.interrupt()}")
        manifest.write(wd, manifest.build(wd, cfg, executor=executor_info))
        raise
    bar.close()
    return [failures[s] for s in sorted(failures)]


def failure_report(failures: list[Failure], cfg: RunConfig, retries: int) -> str:
    ranges = cfg.ranges()
    if all(not f.retryable for f in failures):
        lines = [f"{len(failures)} shard(s) failed in a way that repeats on every attempt (not retried); "
                 "fix the cause, then rerun the same command:"]
    else:
        lines = [f"{len(failures)} shard(s) still failed after {retries} retr{'y' if retries == 1 else 'ies'}; "
                 "rerun the same command to retry them:"]
    for f in failures:
        r = ranges[f.shard]
        lines.append(f"  shard {f.shard} (input lines {r.start + 1}-{r.stop}): {f.reason}"
                     + ("" if f.retryable else " [not retried]"))
        if f.log is not None:
            lines.append(f"    log: {f.log}")
    return "\n".join(lines)


def run_job(wd: WorkDir, req: RunRequest, make_executor: Callable[[RunConfig], tuple[Executor, dict]], *,
            retries: int = 2, fresh: bool = False, ref: Path | None = None, progress: bool = False,
            echo: Callable[[str], None] = print) -> dict:
    """The whole job, as ``bild-jobs run`` does it: check the request, plan or resume it in ``wd``,
    run the shards not done yet on the executor ``make_executor(cfg)`` returns (with its manifest
    description), and collect the output; returns the manifest. Raises ``ConfigError``,
    ``PairDirError``, ``ConfigChanged``, ``RunFailed`` and the work directory's and collection's errors."""
    given = req.decoding
    req, spec = check_request(req, echo)
    output_lock = req.output.with_name(f".{req.output.name}.lock")  # two work dirs, one output: refused
    with wd.lock(), exclusive(output_lock, f"the output {req.output}"):
        cfg = plan_run(wd, req, spec, fresh, echo)
        if ref is not None:
            check_reference(cfg, ref)
        executor, info = make_executor(cfg)
        started = time.time()
        failures = execute(wd, cfg, executor, retries, echo, progress, info)
        if failures:
            raise RunFailed(failure_report(failures, cfg, retries))
        last_run = {**_last_run(wd, cfg, started), "mode_note": mode_note(given, req.decoding, spec)}
        return collect(wd, cfg, req.output, ref, last_run=last_run)


def _last_run(wd: WorkDir, cfg: RunConfig, started: float) -> dict:
    """The shards this run decoded and its own wall time (a resumed run's totals span all runs)."""
    ranges = cfg.ranges()
    done = [i for i in range(cfg.shards) if (r := wd.read_record(i)) is not None and (r.finished or 0) >= started]
    wall = time.time() - started
    lines = sum(len(ranges[i]) for i in done)
    return {"shards": len(done), "lines": lines, "wall_seconds": wall,
            "lines_per_second": lines / wall if done and wall > 0 else None}
