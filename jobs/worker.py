"""One shard in its own process: ``python -m jobs.worker WORKDIR SHARD [--log PATH]``.

The local and the Slurm executor both run this, so a shard fails, logs and resumes the same way
wherever it ran. Exit status 0: the shard is done. 1: it failed and its record says why. Killed:
the record still says "running", with no output file, and the driver reports the signal.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
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

#: failures that repeat on every attempt: reported whole, never retried
DETERMINISTIC = (CheckpointError, BildOptionError, PairDirError, UnsafeCheckpointError)

PROGRESS_EVERY_S = 1.0
# Isolating lines the decoder cannot process stops here: a broken model or a bug fails every
# line, and must fail the shard rather than empty it.
MAX_FAILED_LINES = 10


class ProgressFile:
    """The API's progress callback (lines finished since the last call), summed and written to the
    shard's progress file at most once a second."""

    def __init__(self, path: Path, total: int):
        self.path, self.total, self.done, self.last = path, total, 0, 0.0

    def __call__(self, lines: int) -> None:
        self.done = min(self.done + lines, self.total)  # lines retried while isolating count once
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            write_atomic(self.path, str(self.done))
            self.last = now


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


def translate_isolating(translator, lines: Sequence[str], offset: int, progress: Callable[[int], None],
                        failed: list[list], **kwargs) -> tuple[list[str], list[list], list[dict]]:
    """``translator.translate`` over ``lines``; when it raises, bisect to find the lines it cannot
    process, give them an empty output and a ``failed`` issue, and keep every other line's output.

    Returns hypotheses, issues ([input line, kind, detail]) and the stats dicts of the calls.
    """
    try:
        out = translator.translate(lines, progress=progress, **kwargs)
    except Exception as e:
        if len(lines) == 1:
            failed.append([offset, "failed", _headline(e)])
            if len(failed) > MAX_FAILED_LINES:
                raise
            return [""], [failed[-1]], []
        mid = len(lines) // 2
        left = translate_isolating(translator, lines[:mid], offset, progress, failed, **kwargs)
        right = translate_isolating(translator, lines[mid:], offset + mid, progress, failed, **kwargs)
        return left[0] + right[0], left[1] + right[1], left[2] + right[2]
    if len(out.hypotheses) != len(lines):
        raise RuntimeError(f"the decoder returned {len(out.hypotheses)} hypotheses for {len(lines)} lines")
    return out.hypotheses, [[offset + i.index, i.kind, i.detail] for i in out.issues], [out.stats]


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


def run_shard(wd: WorkDir, index: int, log: Path | None) -> ShardRecord:
    cfg = RunConfig.load(wd.config)
    lines = cfg.ranges()[index]
    record = ShardRecord(index=index, start=lines.start, stop=lines.stop, config_hash=cfg.hash, status="running",
                         attempt=wd.start_attempt(index, cfg.hash), host=os.uname().nodename, pid=os.getpid(),
                         started=process_start_time(), log=str(log) if log else None)
    wd.write_record(record)
    print(f"shard {index}: lines {lines.start}-{lines.stop - 1} of {cfg.input}, attempt {record.attempt}, "
          f"pid {record.pid} on {record.host}", flush=True)
    try:
        from bild_fairseq.api import PairTranslator

        texts, issues = read_shard(Path(cfg.input), lines)
        t0 = time.monotonic()
        translator = PairTranslator.from_pair_dir(cfg.pair_dir, device=resolve_device(cfg.device),
                                                  **cfg.decoding.translator_kwargs())
        t1 = time.monotonic()
        hyps, decoded_issues, stats = translate_isolating(
            translator, texts, 0, ProgressFile(wd.progress(index), len(texts)), [],
            max_tokens=cfg.max_tokens, max_sentences=cfg.max_sentences)
        t2 = time.monotonic()
        with atomic_writer(wd.output(index)) as f:
            for hyp in hyps:  # a newline inside a hypothesis would shift every later line
                f.write(hyp.replace("\n", " ").replace("\r", " ") + "\n")
        record.output_lines, record.output_sha256 = count_and_hash(wd.output(index))
        record.issues = sorted(issues + [[lines.start + i, kind, detail] for i, kind, detail in decoded_issues])
        record.stats = merge_stats(stats)
        record.decoding = translator.config_dict()
        record.timings = {"load": t1 - t0, "decode": t2 - t1}
        record.status = "done"
    except DETERMINISTIC as e:  # the same on every attempt: say it whole, do not retry
        record.status, record.error, record.retryable = "failed", str(e), False
    except Exception as e:
        traceback.print_exc()  # the whole story goes to the log; the record keeps a headline
        record.status, record.error = "failed", _headline(e)
    record.finished = time.time()
    record.timings["total"] = record.finished - record.started
    wd.write_record(record)
    wd.progress(index).unlink(missing_ok=True)
    print(f"shard {index}: {record.status} in {record.timings['total']:.1f} s", flush=True)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("shard", type=int)
    parser.add_argument("--log", type=Path, help="this attempt's log file, recorded for reports")
    args = parser.parse_args(argv)
    wd = WorkDir(args.workdir)
    log = args.log
    if log is None and "SLURM_ARRAY_JOB_ID" in os.environ:
        log = wd.slurm_log(args.shard, os.environ["SLURM_ARRAY_JOB_ID"])
    return 0 if run_shard(wd, args.shard, log).status == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
