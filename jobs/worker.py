"""One shard in its own process: ``python -m jobs.worker WORKDIR SHARD [--log PATH] [--die-with PID]``.

The local and the Slurm executor both run this, so a shard fails, logs and resumes the same way
wherever it ran. Exit status 0: the shard is done. 1: it failed and its record says why. Killed:
the record still says "running", with no output file, and the driver reports the signal.

The shard is decoded in chunks of ``chunk_lines`` lines, each published (``shards/NNNNN.parts/``)
as it ends: a later attempt continues after the last published chunk, and the shard's output is
their concatenation, byte for byte what one uninterrupted call writes.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from bild_fairseq.checkpoints import CheckpointError
from bild_fairseq.config import BildOptionError
from bild_fairseq.pairdir import PairDirError
from bild_fairseq.safe_load import UnsafeCheckpointError
from jobs.config import RunConfig
from jobs.manifest import merge_stats
from jobs.shards import decode_line, iter_lines
from jobs.workdir import ShardRecord, WorkDir, atomic_writer, count_and_hash, write_atomic

PR_SET_PDEATHSIG = 1  # linux/prctl.h

#: failures that repeat on every attempt: reported whole, never retried
DETERMINISTIC = (CheckpointError, BildOptionError, PairDirError, UnsafeCheckpointError)

PROGRESS_EVERY_S = 1.0
# Isolating lines the decoder cannot process stops here: a broken model or a bug fails every
# line, and must fail the shard rather than empty it.
MAX_FAILED_LINES = 10
# Out of memory: the batch is halved; below this many tokens, one sentence per batch.
MIN_BATCH_TOKENS = 64
# Errors of the machine, not of a line: the shard fails (and is retried), no line is charged.
CUDA_ERROR = re.compile(r"\bCUDA\b|cuDNN|CUBLAS|NCCL", re.IGNORECASE)


class Superseded(RuntimeError):
    """The run's configuration changed while this worker decoded (``--fresh``): publish nothing."""


class ProgressFile:
    """The API's progress callback (lines finished since the last call), written to the shard's
    progress file at most once a second. Lines of a call that then fails are taken back
    (:meth:`rollback`), so lines decoded again while isolating a bad one count once."""

    def __init__(self, path: Path, total: int, done: int = 0):
        self.path, self.total, self.done, self.pending, self.last = path, total, done, 0, 0.0

    def __call__(self, lines: int) -> None:
        self.pending += lines
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            write_atomic(self.path, str(min(self.done + self.pending, self.total)))
            self.last = now

    def commit(self) -> None:
        self.done, self.pending = self.done + self.pending, 0

    def rollback(self) -> None:
        self.pending = 0


def read_shard(path: Path, lines: range) -> tuple[list[str], list[list]]:
    """The shard's lines as text, and an issue for each line with invalid UTF-8 or NUL bytes."""
    texts, issues = [], []
    for i, raw in enumerate(iter_lines(path, lines.start, lines.stop)):
        text, invalid = decode_line(raw)
        texts.append(text)
        if invalid:
            issues.append([lines.start + i, "invalid_utf8", "invalid UTF-8 bytes replaced by U+FFFD"])
        if "\0" in text:  # decoded as is (the BPE sees it as a character), but rarely meant
            issues.append([lines.start + i, "nul_byte", f"{text.count(chr(0))} NUL byte(s) in the line"])
    if len(texts) != len(lines):
        raise RuntimeError(f"{path} has {lines.start + len(texts)} lines, the run was planned for more: "
                           "the input changed since the run started; rerun with --fresh")
    return texts, issues


@dataclass
class BatchSize:
    """The batch limits, halved after each out-of-memory error for the rest of the shard."""

    max_tokens: int
    max_sentences: int | None = None

    def shrink(self) -> bool:
        """Halve the batch; False when it is one sentence already."""
        if self.max_sentences == 1:
            return False
        self.max_tokens = max(1, self.max_tokens // 2)
        if self.max_tokens < MIN_BATCH_TOKENS:
            self.max_sentences = 1
        return True


def is_out_of_memory(error: Exception) -> bool:
    import torch

    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text \
        or "can't allocate memory" in text


def is_environment_error(error: Exception) -> bool:
    """A fault of the machine (CUDA, host memory, files): it says nothing about the lines."""
    return isinstance(error, (MemoryError, OSError)) or (isinstance(error, RuntimeError)
                                                         and CUDA_ERROR.search(str(error)) is not None)


class IsolatingDecoder:
    """``translator.translate`` that tells the lines' faults from the machine's:

    - out of memory: the batch is halved and the call repeated (said in the log); at one
      sentence per batch the error fails the shard, to be retried;
    - a CUDA error, ``MemoryError`` or ``OSError``: raised, so the shard fails and is retried;
    - any other error: the lines are bisected, and a line that fails alone, twice, gets an
      empty output and a ``failed`` issue; every other line keeps its output.
    """

    def __init__(self, translator, progress: ProgressFile, batch: BatchSize):
        self.translator, self.progress, self.batch = translator, progress, batch
        self.failed: list[list] = []

    def decode(self, lines: Sequence[str], offset: int, retried: bool = False
               ) -> tuple[list[str], list[list], list[dict]]:
        """Hypotheses, issues ([line, kind, detail], ``offset`` + index) and the stats of the calls."""
        try:
            out = self.translator.translate(lines, progress=self.progress, max_tokens=self.batch.max_tokens,
                                            max_sentences=self.batch.max_sentences)
        except Exception as e:
            self.progress.rollback()
            if is_out_of_memory(e):
                return self._after_out_of_memory(e, lines, offset)
            if is_environment_error(e):
                raise
            if len(lines) > 1:
                mid = len(lines) // 2
                left, right = self.decode(lines[:mid], offset), self.decode(lines[mid:], offset + mid)
                return left[0] + right[0], left[1] + right[1], left[2] + right[2]
            if not retried:  # a transient fault passes; a line's own fault repeats
                return self.decode(lines, offset, retried=True)
            self.failed.append([offset, "failed", _headline(e)])
            if len(self.failed) > MAX_FAILED_LINES:
                raise
            return [""], [self.failed[-1]], []
        self.progress.commit()
        if len(out.hypotheses) != len(lines):
            raise RuntimeError(f"the decoder returned {len(out.hypotheses)} hypotheses for {len(lines)} lines")
        return out.hypotheses, [[offset + i.index, i.kind, i.detail] for i in out.issues], [out.stats]

    def _after_out_of_memory(self, error: Exception, lines: Sequence[str], offset: int
                             ) -> tuple[list[str], list[list], list[dict]]:
        import torch

        before = f"--max-tokens {self.batch.max_tokens}" + (f" --max-sentences {self.batch.max_sentences}"
                                                            if self.batch.max_sentences else "")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self.batch.shrink():
            raise error
        print(f"out of memory at {before} ({_headline(error, 120)}): retrying with --max-tokens "
              f"{self.batch.max_tokens}" + (" --max-sentences 1" if self.batch.max_sentences == 1 else ""), flush=True)
        return self.decode(lines, offset)


def _headline(error: Exception, limit: int = 300) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def process_start_time() -> float:
    """When this process started (Linux), so shard timings include Python, torch and fairseq start-up."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Chunk:
    """A published chunk of a shard: its lines [start, stop) (counted from the shard's first line),
    its output's sha256, the issues of its lines and its decoding stats."""

    config_hash: str
    start: int
    stop: int
    sha256: str
    issues: list
    stats: dict


def check_current(wd: WorkDir, config_hash: str) -> None:
    """Raise :class:`Superseded` unless ``config.json`` still holds the run this worker decodes."""
    try:
        current = RunConfig.load(wd.config).hash
    except (OSError, ValueError, TypeError):
        current = None
    if current != config_hash:
        raise Superseded(f"the run's configuration changed while this worker decoded (config {config_hash}, now "
                         f"{current or 'none'}): nothing published")


class Parts:
    """A shard's published chunks: ``START.out`` (the outputs) then ``START.json`` (a :class:`Chunk`),
    each renamed into place only while the run's configuration is still this worker's."""

    def __init__(self, directory: Path, config_hash: str, still_current: Callable[[], None]):
        self.dir, self.config_hash, self.still_current = directory, config_hash, still_current

    def _paths(self, start: int) -> tuple[Path, Path]:
        return self.dir / f"{start:09d}.out", self.dir / f"{start:09d}.json"

    def resume(self, total: int) -> list[Chunk]:
        """The chunks of earlier attempts that follow one another from line 0, of this
        configuration, with intact outputs; anything else in the directory is deleted."""
        chunks: list[Chunk] = []
        for meta in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                chunk = Chunk(**json.loads(meta.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                break
            out = self._paths(chunk.start)[0]
            if (chunk.config_hash != self.config_hash or chunk.start != (chunks[-1].stop if chunks else 0)
                    or chunk.stop > total or meta != self._paths(chunk.start)[1] or not out.is_file()
                    or count_and_hash(out) != (chunk.stop - chunk.start, chunk.sha256)):
                break
            chunks.append(chunk)
        keep = {path for chunk in chunks for path in self._paths(chunk.start)}
        for path in self.dir.iterdir() if self.dir.is_dir() else []:
            if path not in keep:
                path.unlink()
        return chunks

    def publish(self, start: int, hyps: list[str], issues: list[list], stats: dict) -> Chunk:
        # a newline inside a hypothesis would shift every later line
        data = "".join(h.replace("\n", " ").replace("\r", " ") + "\n" for h in hyps).encode("utf-8")
        chunk = Chunk(self.config_hash, start, start + len(hyps), hashlib.sha256(data).hexdigest(), issues, stats)
        out, meta = self._paths(start)
        self.dir.mkdir(exist_ok=True)
        with atomic_writer(out, "wb", before_replace=self.still_current) as f:
            f.write(data)
        with atomic_writer(meta, before_replace=self.still_current) as f:
            f.write(json.dumps(asdict(chunk)) + "\n")
        return chunk

    def assemble(self, chunks: list[Chunk], output: Path) -> tuple[int, str]:
        """Write the chunks' outputs as ``output``; returns the line count and sha256 of the bytes
        written (not of the file after the rename, which another writer could have replaced)."""
        digest, lines = hashlib.sha256(), 0
        with atomic_writer(output, "wb", before_replace=self.still_current) as f:
            for chunk in chunks:
                path = self._paths(chunk.start)[0]
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != chunk.sha256:
                    raise RuntimeError(f"{path} changed after it was published: rerun to decode its lines again")
                f.write(data)
                digest.update(data)
                lines += data.count(b"\n")
        shutil.rmtree(self.dir, ignore_errors=True)
        return lines, digest.hexdigest()


def run_shard(wd: WorkDir, index: int, log: Path | None) -> ShardRecord:
    cfg = RunConfig.load(wd.config)
    lines = cfg.ranges()[index]
    still_current = partial(check_current, wd, cfg.hash)
    record = ShardRecord(index=index, start=lines.start, stop=lines.stop, config_hash=cfg.hash, status="running",
                         attempt=wd.start_attempt(index, cfg.hash), host=os.uname().nodename, pid=os.getpid(),
                         started=process_start_time(), log=str(log) if log else None)
    wd.write_record(record)
    print(f"shard {index}: lines {lines.start}-{lines.stop - 1} of {cfg.input}, attempt {record.attempt}, "
          f"pid {record.pid} on {record.host}", flush=True)
    try:
        from bild_fairseq.api import PairTranslator

        texts, issues = read_shard(Path(cfg.input), lines)
        parts = Parts(wd.parts(index), cfg.hash, still_current)
        chunks = parts.resume(len(texts))
        record.resumed_lines = chunks[-1].stop if chunks else 0
        if record.resumed_lines:
            print(f"shard {index}: resuming after its first {record.resumed_lines} lines (published by an earlier "
                  "attempt)", flush=True)
        t0 = time.monotonic()
        translator = PairTranslator.from_pair_dir(cfg.pair_dir, device=resolve_device(cfg.device),
                                                  **cfg.decoding.translator_kwargs())
        t1 = time.monotonic()
        decoder = IsolatingDecoder(translator, ProgressFile(wd.progress(index), len(texts), record.resumed_lines),
                                   BatchSize(cfg.max_tokens, cfg.max_sentences))
        for start in range(record.resumed_lines, len(texts), cfg.chunk_lines):
            hyps, decoded, stats = decoder.decode(texts[start:start + cfg.chunk_lines], start)
            chunks.append(parts.publish(start, hyps, decoded, merge_stats(stats)))
        t2 = time.monotonic()
        record.output_lines, record.output_sha256 = parts.assemble(chunks, wd.output(index))
        record.issues = sorted(issues + [[lines.start + i, kind, detail] for c in chunks for i, kind, detail in c.issues])
        record.stats = merge_stats(c.stats for c in chunks)
        record.decoding = translator.config_dict()
        record.timings = {"load": t1 - t0, "decode": t2 - t1}
        record.status = "done"
    except Superseded as e:
        print(f"shard {index}: {e}", flush=True)
        record.status, record.error = "failed", str(e)
        return record
    except DETERMINISTIC as e:  # the same on every attempt: say it whole, do not retry
        record.status, record.error, record.retryable = "failed", str(e), False
    except Exception as e:
        traceback.print_exc()  # the whole story goes to the log; the record keeps a headline
        record.status, record.error = "failed", _headline(e)
    record.finished = time.time()
    record.timings["total"] = record.finished - record.started
    try:
        wd.write_record(record, before_replace=still_current)
    except Superseded as e:
        print(f"shard {index}: {e}", flush=True)
        record.status = "failed"
        return record
    wd.progress(index).unlink(missing_ok=True)
    print(f"shard {index}: {record.status} in {record.timings['total']:.1f} s", flush=True)
    return record


def die_with(pid: int) -> None:
    """SIGTERM this process when ``pid`` (its parent, the driver) dies, even by SIGKILL, so no
    orphan decodes a shard that a rerun starts again. Set here rather than in ``preexec_fn``,
    which is unsafe after fork in a multithreaded driver."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != pid:  # the driver died before the signal was armed
        sys.exit(f"the driver (pid {pid}) is gone: not starting")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("shard", type=int)
    parser.add_argument("--log", type=Path, help="this attempt's log file, recorded for reports")
    parser.add_argument("--die-with", type=int, metavar="PID", help="exit when the parent process PID dies")
    args = parser.parse_args(argv)
    if args.die_with is not None:
        die_with(args.die_with)
    wd = WorkDir(args.workdir)
    log = args.log
    if log is None and "SLURM_ARRAY_JOB_ID" in os.environ:
        log = wd.slurm_log(args.shard, os.environ["SLURM_ARRAY_JOB_ID"])
    return 0 if run_shard(wd, args.shard, log).status == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
