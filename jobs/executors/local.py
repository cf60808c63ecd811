"""Workers as child processes of the driver: one per GPU, or several CPU workers without one."""
from __future__ import annotations

import os
import signal
import subprocess
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from jobs.config import ConfigError
from jobs.executors.base import Ended, Executor
from jobs.workdir import WorkDir

TERMINATE_GRACE_S = 10.0
THREADS_PER_CPU_WORKER = 4  # default CPU split: fewer, wider workers keep model copies in RAM few


def visible_gpus() -> list[str]:
    """GPU ids a child may be given in CUDA_VISIBLE_DEVICES (the driver's own restriction holds)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def plan_slots(device: str, workers: int | None) -> list[dict[str, str]]:
    """The environment of each worker slot: a GPU each (round robin when ``workers`` exceeds the
    GPUs), or, on CPU, hidden GPUs. Either way a fair share of this machine's cores as threads (or
    the driver's own ``OMP_NUM_THREADS``: cores busy with other work are not a fair share): a GPU
    worker's CPU threads tokenize and launch kernels, and torch's default of one thread per core
    in every worker would oversubscribe the cores N times over."""
    gpus = visible_gpus() if device != "cpu" else []
    if device == "cuda" and not gpus:
        raise ConfigError("--device cuda, but no GPU is visible here (CUDA_VISIBLE_DEVICES / torch): "
                          "use --device cpu, or run on a GPU machine")
    cores = len(os.sched_getaffinity(0))
    workers = workers or len(gpus) or max(1, cores // THREADS_PER_CPU_WORKER)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // workers))
    if not threads.isdigit() or int(threads) < 1:
        raise ConfigError(f"OMP_NUM_THREADS={threads!r} is not a positive integer: unset it or set it to the "
                          "number of decoding threads each worker should use")
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)] if gpus else "", "OMP_NUM_THREADS": threads,
             "MKL_NUM_THREADS": threads} for i in range(workers)]


def on_gpu(slots: list[dict[str, str]]) -> bool:
    """Whether :func:`plan_slots`' workers decode on GPUs."""
    return any(s["CUDA_VISIBLE_DEVICES"] for s in slots)


@dataclass
class _Running:
    shard: int
    process: subprocess.Popen
    log: Path
    log_file: IO


class LocalExecutor(Executor):
    name = "local"
    poll_interval_s = 0.5

    def __init__(self, wd: WorkDir, python: Sequence[str], slots: list[dict[str, str]]):
        super().__init__(wd, python)
        self.slots = slots
        self.queue: deque[int] = deque()
        self.running: dict[int, _Running] = {}  # slot -> worker

    def submit(self, shards: Sequence[int]) -> None:
        self.queue.extend(shards)
        self._fill_slots()

    def _fill_slots(self) -> None:
        for slot, env in enumerate(self.slots):
            if slot in self.running or not self.queue:
                continue
            shard = self.queue.popleft()
            log = self.wd.local_log(shard, self.wd.read_record(shard).attempt)  # queued by the driver
            log_file = open(log, "ab")
            # own session: Ctrl-C reaches the driver only, which then stops the workers itself;
            # --die-with: the worker ends with the driver, even one killed by SIGKILL
            process = subprocess.Popen([*self.worker_command(), str(shard), "--log", str(log),
                                        "--die-with", str(os.getpid())],
                                       env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            self.running[slot] = _Running(shard, process, log, log_file)

    def poll(self) -> list[Ended]:
        ended = []
        for slot, w in list(self.running.items()):
            code = w.process.poll()
            if code is None:
                continue
            w.log_file.close()
            del self.running[slot]
            ended.append(Ended(w.shard, w.log, _exit_reason(code)))
        self._fill_slots()
        return ended

    def active(self) -> list[int]:
        return [*self.queue, *(w.shard for w in self.running.values())]

    def interrupt(self) -> str:
        self.queue.clear()
        for w in self.running.values():
            w.process.terminate()
        for w in self.running.values():
            try:
                w.process.wait(TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
            w.log_file.close()
        stopped = len(self.running)
        self.running.clear()
        return f"stopped {stopped} local worker(s)"


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"the worker was killed by {signal.Signals(-code).name}"
    return f"the worker exited with status {code}"
