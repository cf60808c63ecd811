"""The executor interface: start shard workers somewhere, report each one's end.

Executors only run ``python -m jobs.worker WORKDIR SHARD``; whether a shard is done is decided by
its record and output in the work directory, never by an exit status or a scheduler's job state,
so nothing an executor misreports can make a half shard look complete.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from jobs.workdir import WorkDir


@dataclass(frozen=True)
class Ended:
    """A worker that is no longer running; ``reason`` explains an end without a result."""

    shard: int
    log: Path | None
    reason: str


class Executor(ABC):
    name: str
    poll_interval_s: float
    #: how long a worker's last writes may take to be seen here (a shared filesystem's caches):
    #: a worker that ended without a visible result is looked at again after this long
    settle_grace_s: float = 0.0

    def __init__(self, wd: WorkDir, python: Sequence[str]):
        self.wd = wd
        self.python = list(python)

    def worker_command(self) -> list[str]:
        """The worker for this work directory; the shard number (and ``--log``) follow."""
        return [*self.python, "-m", "jobs.worker", str(self.wd.root)]

    def attach(self) -> list[int]:
        """Take over the shards an earlier driver left running; returns them. Local workers die
        with their driver, so there is nothing to take over unless the executor says otherwise."""
        return []

    @abstractmethod
    def submit(self, shards: Sequence[int]) -> None:
        """Start (or queue) one worker per shard."""

    @abstractmethod
    def poll(self) -> list[Ended]:
        """Workers that ended since the last poll."""

    @abstractmethod
    def active(self) -> list[int]:
        """Shards submitted and not yet reported ended."""

    @abstractmethod
    def interrupt(self) -> str:
        """Handle Ctrl-C on the driver; return what happened to the workers, for the user."""
