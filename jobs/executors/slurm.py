"""Workers as a Slurm job array, one array task per shard, submitted with plain ``sbatch``.

Why sbatch and not submitit: the job script is an ordinary file the user can read, print
(``--dry-run``) and resubmit by hand; state lives in the work directory and in ``squeue``, so a
driver that dies (or runs as its own short job) loses nothing, and a rerun attaches to the jobs
still queued; and no sacct/slurmdbd is needed (without it submitit cannot tell job states).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import jobs
from jobs.executors.base import Ended, Executor
from jobs.workdir import WorkDir, write_atomic

SQUEUE_TRIES = 5
#: squeue is polled at most this often on a real cluster: every call costs slurmctld, shared by all
POLL_INTERVAL_S = 30.0


class SlurmError(RuntimeError):
    """sbatch or squeue failed; the message carries Slurm's own words."""


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    time: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    max_parallel: int | None = None  # array throttle: at most this many shards at once
    extra: tuple[str, ...] = field(default_factory=tuple)  # verbatim sbatch options

    def directives(self) -> list[str]:
        opts = [f"--partition={self.partition}" if self.partition else None,
                f"--time={self.time}" if self.time else None,
                f"--gres=gpu:{self.gpus_per_task}" if self.gpus_per_task else None,
                f"--cpus-per-task={self.cpus_per_task}" if self.cpus_per_task else None,
                f"--mem={self.mem}" if self.mem else None, *self.extra]
        return [o for o in opts if o]


def array_spec(shards: Sequence[int], max_parallel: int | None = None) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8`` (``%N`` appended to throttle)."""
    parts, ordered = [], sorted(shards)
    start = prev = ordered[0]
    for s in [*ordered[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        start = prev = s
    return ",".join(parts) + (f"%{max_parallel}" if max_parallel else "")


def _slurm_env() -> dict[str, str]:
    """The driver's environment minus the SLURM_* variables of a job it may itself run in
    (inherited, they make sbatch copy that job's memory/CPU settings); SLURM_CONF stays."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def _run(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=_slurm_env())
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: run on a Slurm login node, or use --executor local") from None
    if done.returncode != 0:
        raise SlurmError(f"`{shlex.join(cmd)}` failed (status {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def queue_states(job_ids: Sequence[str]) -> dict[tuple[str, int], str]:
    """(array job id, shard) -> squeue state (PENDING, RUNNING, ...) of our tasks still queued.

    Lists all of the user's jobs and filters, since ``squeue -j`` fails on ids it has forgotten.
    Retries a few times: a busy slurmctld times out now and then, and that must not read as
    "every task ended".
    """
    for attempt in range(SQUEUE_TRIES):
        try:
            out = _run(["squeue", "--noheader", "--array", "--me", "--format=%F|%K|%T"])
            break
        except SlurmError:
            if attempt == SQUEUE_TRIES - 1:
                raise
            time.sleep(2 ** attempt)
    wanted, states = set(job_ids), {}
    for line in out.splitlines():
        job, task, state = line.strip().split("|")
        if job in wanted and task.isdigit():
            states[(job, int(task))] = state
    return states


def submitted_jobs(wd: WorkDir) -> list[dict]:
    """Every array job submitted for this work directory: ``{"job_id", "shards", "submitted"}``."""
    path = wd.slurm / "jobs.json"
    return json.loads(path.read_text()) if path.is_file() else []


def live_tasks(wd: WorkDir) -> list[str]:
    """``JOB_SHARD`` of this work directory's array tasks still queued or running."""
    jobs = submitted_jobs(wd)
    return [f"{job}_{shard}" for job, shard in sorted(queue_states([j["job_id"] for j in jobs]))] if jobs else []


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, wd: WorkDir, python: Sequence[str], options: SlurmOptions, job_name: str,
                 poll_interval_s: float = POLL_INTERVAL_S):
        super().__init__(wd, python)
        # a task's record is read again one poll after it left squeue (NFS may show it late)
        self.poll_interval_s = self.settle_grace_s = poll_interval_s
        self.options = options
        self.job_name = job_name
        self.tracked: dict[int, str] = {}  # shard -> array job id
        self.gone: set[int] = set()  # shards missing from squeue at the previous poll

    @property
    def script_path(self) -> Path:
        return self.wd.slurm / "job.sh"

    def job_script(self) -> str:
        cmd = f'{shlex.join(self.worker_command())} "$SLURM_ARRAY_TASK_ID"'
        lines = ["#!/bin/bash",
                 f"# bild-jobs shard workers for {self.wd.root}: one array task per shard.",
                 f"# Submitted as: sbatch --array=SHARDS[%MAX_PARALLEL] {self.script_path}",
                 f"#SBATCH --job-name={self.job_name}",
                 f"#SBATCH --output={self.wd.slurm_log('%5a', '%A')}",
                 "#SBATCH --ntasks=1",
                 *(f"#SBATCH {o}" for o in self.options.directives()),
                 "set -eu",
                 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" MKL_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"']
        checkout = Path(jobs.__file__).resolve().parent.parent
        if (checkout / "setup.py").is_file():  # a source checkout: workers run this code, not another copy
            lines.append(f"export PYTHONPATH={shlex.quote(str(checkout))}${{PYTHONPATH:+:$PYTHONPATH}}")
        if not self.options.gpus_per_task:  # no GPU asked for: do not use one Slurm did not give
            lines.append("export CUDA_VISIBLE_DEVICES=")
        lines.append(f"exec {cmd}")
        return "\n".join(lines) + "\n"

    def sbatch_command(self, shards: Sequence[int]) -> list[str]:
        return ["sbatch", "--parsable", f"--array={array_spec(shards, self.options.max_parallel)}",
                str(self.script_path)]

    def write_script(self) -> Path:
        self.wd.slurm.mkdir(parents=True, exist_ok=True)
        write_atomic(self.script_path, self.job_script())
        return self.script_path

    def submit(self, shards: Sequence[int]) -> None:
        self.write_script()
        job_id = _run(self.sbatch_command(shards)).strip().split(";")[0]
        jobs_list = submitted_jobs(self.wd)
        jobs_list.append({"job_id": job_id, "shards": list(shards), "submitted": time.time()})
        write_atomic(self.wd.slurm / "jobs.json", json.dumps(jobs_list, indent=1) + "\n")
        self.tracked.update({s: job_id for s in shards})

    def attach(self) -> list[int]:
        """Track the shards of earlier submissions still queued or running; returns them."""
        states = queue_states([j["job_id"] for j in submitted_jobs(self.wd)])
        self.tracked.update({shard: job for job, shard in states})
        return sorted(shard for _, shard in states)

    def poll(self) -> list[Ended]:
        states = queue_states(sorted(set(self.tracked.values())))
        ended = []
        for shard, job in list(self.tracked.items()):
            if (job, shard) in states:
                continue
            # gone twice in a row: on a shared filesystem the worker's last writes may lag
            if shard in self.gone:
                self.gone.discard(shard)
                del self.tracked[shard]
                ended.append(Ended(shard, self.wd.slurm_log(shard, job),
                                   f"Slurm array task {job}_{shard} ended"))
            else:
                self.gone.add(shard)
        return ended

    def active(self) -> list[int]:
        return sorted(self.tracked)

    def interrupt(self) -> str:
        jobs_running = " ".join(sorted(set(self.tracked.values())))
        return (f"Slurm job(s) {jobs_running} keep running: rerun the same command to wait for them and collect, "
                f"`bild-jobs status {self.wd.root}` to watch them, or `scancel {jobs_running}` to stop them")
