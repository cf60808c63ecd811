"""``bild-jobs status``: each shard's state from its record, and from squeue for Slurm runs.

Reads only; it works while a driver runs, after it died, or when there never was one
(a job script submitted by hand after ``--dry-run``).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from jobs.config import RunConfig
from jobs.executors.slurm import queue_states, submitted_jobs
from jobs.workdir import ShardRecord, WorkDir


@dataclass(frozen=True)
class ShardState:
    index: int
    lines: range
    state: str  # pending | running | done | failed
    attempt: int
    detail: str


def _alive_here(record: ShardRecord) -> bool:
    if record.host != os.uname().nodename:
        return False
    try:
        return "jobs.worker" in Path(f"/proc/{record.pid}/cmdline").read_text()
    except OSError:
        return False


def shard_states(wd: WorkDir, cfg: RunConfig) -> list[ShardState]:
    jobs = submitted_jobs(wd)
    queued = {shard: (job, state) for (job, shard), state in queue_states([j["job_id"] for j in jobs]).items()} \
        if jobs else {}
    states = []
    for i, lines in enumerate(cfg.ranges()):
        record = wd.read_record(i)
        if record is not None and record.config_hash != cfg.hash:
            record = None
        attempt = record.attempt if record else 0
        if i in queued:
            job, slurm_state = queued[i]
            state = "running" if slurm_state in ("RUNNING", "COMPLETING") else "pending"
            detail = f"slurm {job}_{i} {slurm_state}"
            if state == "running" and record is not None and record.status == "running":
                detail += f", {wd.lines_in_progress(i)}/{len(lines)} lines on {record.host}"
        elif problem := wd.damage(i, cfg.hash):
            state, detail = "damaged", f"{problem}; the next run recomputes it"
        elif record is None:
            state, detail = "pending", ""
        elif record.status == "queued":
            state, detail = "pending", f"queued for attempt {record.attempt}"
        elif record.status == "done" and wd.is_done(i, cfg.hash):
            state, detail = "done", f"{record.timings.get('total', 0):.1f} s on {record.host}"
        elif record.status == "running" and not jobs and _alive_here(record):
            state, detail = "running", f"{wd.lines_in_progress(i)}/{len(lines)} lines, pid {record.pid}"
        else:
            reason = record.error if record.status == "failed" else "the worker ended without a result"
            state, detail = "failed", f"{reason} (log: {record.log})"
        states.append(ShardState(i, lines, state, attempt, detail))
    return states


def status_table(wd: WorkDir, cfg: RunConfig, states: list[ShardState]) -> str:
    counts = Counter(s.state for s in states)
    done_lines = sum(len(s.lines) for s in states if s.state == "done")
    head = (f"{wd.root} (config {cfg.hash}): {cfg.lines} lines in {cfg.shards} shard(s); "
            + ", ".join(f"{counts[k]} {k}" for k in ("done", "running", "pending", "failed", "damaged") if k != "damaged"
                        or counts[k])
            + f"; {done_lines}/{cfg.lines} lines done")
    rows = [f"{'shard':>5}  {'input lines':<17}  {'state':<7}  {'try':>3}  detail"]
    rows += [f"{s.index:>5}  {f'{s.lines.start + 1}-{s.lines.stop}':<17}  {s.state:<7}  {s.attempt:>3}  {s.detail}"
             for s in states]
    return "\n".join([head, *rows])
