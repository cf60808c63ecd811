"""The work directory: a run's whole state, as files that workers on any node can share.

    config.json          the run's configuration (jobs.config.RunConfig)
    manifest.json        per-shard status and totals, rewritten by the driver and by collect
    issues.tsv           input lines that were empty, truncated or had invalid UTF-8 (collect)
    shards/00003.out     a finished shard's output lines      } written atomically, output first:
    shards/00003.json    its record (jobs.workdir.ShardRecord) } a record "done" means both exist,
                         and carries the output's line count and sha256, checked before use
    shards/00003.progress  lines decoded so far by a running worker
    shards/00003.parts/    a running shard's finished chunks (NNNNNNNNN.out + .json, written like
                           the shard's own files): a rerun continues after the last one
    logs/shard-00003.local-2.log, logs/shard-00003.slurm-<jobid>.log   worker output per attempt
    slurm/               submitted job scripts and job ids
    digests.json         content digests keyed by (path, size, mtime), so resume need not rehash
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator, TypeVar

T = TypeVar("T")


@contextmanager
def atomic_writer(path: Path, mode: str = "w", before_replace: Callable[[], None] | None = None) -> Iterator[IO]:
    """Write ``path`` through a temporary file renamed over it once complete and synced, so a
    killed writer never leaves a partial file under the final name. The temporary name holds the
    host, the pid and a random part: array tasks on several nodes share one filesystem.
    ``before_replace`` may raise to keep the file unpublished (a stale worker)."""
    tmp = path.with_name(f".{path.name}.{os.uname().nodename}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None or e.filename == str(tmp):  # a failed write names no file: name ours
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str, before_replace: Callable[[], None] | None = None) -> None:
    with atomic_writer(path, before_replace=before_replace) as f:
        f.write(text)


def count_and_hash(path: Path) -> tuple[int, str]:
    """Newline count and sha256 of a file, in one pass."""
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            lines += chunk.count(b"\n")
    return lines, digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardRecord:
    """What a worker reports about one attempt at one shard (``shards/NNNNN.json``)."""

    index: int
    start: int
    stop: int
    config_hash: str
    status: str  # queued (by the driver) | running | done | failed
    attempt: int
    host: str = ""
    pid: int = 0
    started: float = 0.0
    finished: float | None = None
    log: str | None = None
    error: str | None = None
    retryable: bool = True  # False: the failure repeats on every attempt (bad checkpoint, options)
    issues: list = field(default_factory=list)  # [input line (0-based), kind, detail]
    stats: dict = field(default_factory=dict)
    decoding: dict = field(default_factory=dict)  # PairTranslator.config_dict(): what was actually used
    timings: dict = field(default_factory=dict)   # seconds: load, decode, total
    output_lines: int | None = None  # of shards/NNNNN.out as the worker wrote it
    output_sha256: str | None = None
    resumed_lines: int = 0  # lines of the shard this attempt found published by earlier ones

    @property
    def lines(self) -> int:
        return self.stop - self.start


class WorkDirError(RuntimeError):
    """The work directory is in use, or not a work directory."""


class WorkDir:
    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.config = self.root / "config.json"
        self.manifest = self.root / "manifest.json"
        self.issues = self.root / "issues.tsv"
        self.shards = self.root / "shards"
        self.logs = self.root / "logs"
        self.slurm = self.root / "slurm"

    def create(self) -> None:
        for d in (self.shards, self.logs, self.slurm):
            d.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Forget every result (``--fresh``); the lock file stays, its holder is us."""
        for d in (self.shards, self.logs, self.slurm):
            shutil.rmtree(d, ignore_errors=True)
        for f in (self.config, self.manifest, self.issues, self.root / "digests.json"):
            f.unlink(missing_ok=True)

    def output(self, index: int) -> Path:
        return self.shards / f"{index:05d}.out"

    def progress(self, index: int) -> Path:
        return self.shards / f"{index:05d}.progress"

    def parts(self, index: int) -> Path:
        return self.shards / f"{index:05d}.parts"

    def record_path(self, index: int) -> Path:
        return self.shards / f"{index:05d}.json"

    def local_log(self, index: int, attempt: int) -> Path:
        return self.logs / f"shard-{index:05d}.local-{attempt}.log"

    def slurm_log(self, index: int | str, job_id: str) -> Path:
        """``index``/``job_id`` may be sbatch's ``%5a``/``%A`` placeholders: the same name either way."""
        shard = f"{index:05d}" if isinstance(index, int) else index
        return self.logs / f"shard-{shard}.slurm-{job_id}.log"

    def read_record(self, index: int) -> ShardRecord | None:
        """The shard's record; None when there is none or it is unreadable (:meth:`damage` names it)."""
        try:
            return ShardRecord(**json.loads(self.record_path(index).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def damage(self, index: int, config_hash: str) -> str | None:
        """Why a shard that looks done must not be used, or None: its record is unreadable, or
        its output is missing or differs from the line count and checksum its record holds."""
        path = self.record_path(index)
        try:
            record = ShardRecord(**json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            return f"its record {path} is unreadable ({type(e).__name__})"
        if record.status != "done" or record.config_hash != config_hash:
            return None
        output = self.output(index)
        if not output.is_file():
            return f"its output {output} is missing"
        if record.output_sha256 is None:  # written before records carried checksums
            return None
        lines, sha = count_and_hash(output)
        if (lines, sha) != (record.output_lines, record.output_sha256):
            return (f"its output {output} was changed after the worker wrote it ({lines} lines, sha256 "
                    f"{sha[:12]}; the record says {record.output_lines} lines, {record.output_sha256[:12]})")
        return None

    def discard(self, index: int) -> None:
        """Forget a shard's result (a damaged one, to recompute), its published chunks included."""
        for path in (self.record_path(index), self.output(index), self.progress(index)):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.parts(index), ignore_errors=True)

    def write_record(self, record: ShardRecord, before_replace: Callable[[], None] | None = None) -> None:
        write_atomic(self.record_path(record.index), json.dumps(asdict(record), indent=1) + "\n", before_replace)

    def is_done(self, index: int, config_hash: str) -> bool:
        record = self.read_record(index)
        return (record is not None and record.status == "done" and record.config_hash == config_hash
                and self.output(index).is_file())

    def queue(self, index: int, lines: range, config_hash: str) -> ShardRecord:
        """Record that the driver is about to start attempt N+1 at a shard: the worker takes that
        number, and a shard whose worker never started (still "queued") is told apart from one
        whose worker failed (its "failed" record is then surely from this attempt)."""
        previous = self.read_record(index)
        attempt = previous.attempt + 1 if previous and previous.config_hash == config_hash else 1
        record = ShardRecord(index=index, start=lines.start, stop=lines.stop, config_hash=config_hash,
                             status="queued", attempt=attempt)
        self.write_record(record)
        return record

    def start_attempt(self, index: int, config_hash: str) -> int:
        """The attempt number a starting worker takes: the queued one, else (a job script
        submitted by hand, a requeued Slurm task) the one after the last."""
        previous = self.read_record(index)
        if previous is None or previous.config_hash != config_hash:
            return 1
        return previous.attempt if previous.status == "queued" else previous.attempt + 1

    def lines_in_progress(self, index: int) -> int:
        try:
            return int(self.progress(index).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def cached(self, kind: str, path: Path, compute: Callable[[Path], T]) -> T:
        """``compute(path)`` (a pass over the whole file, JSON-able), kept while size and mtime hold."""
        cache_path = self.root / "digests.json"
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        st = path.stat()
        key = f"{kind}:{path.resolve()}"
        entry = cache.get(key)
        if entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
            return entry["value"]
        value = compute(path)
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "value": value}
        write_atomic(cache_path, json.dumps(cache, indent=1) + "\n")
        return value

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One driver per work directory: a second ``run``/``collect`` would race on the same shards."""
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive(self.root / ".lock", str(self.root)):
            yield


#: flock's errors on a file system mounted without lock support (Lustre without -o flock, NFS without lockd)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@contextmanager
def exclusive(lock_file: Path, what: str) -> Iterator[None]:
    """Hold ``lock_file`` (flock, released when the process dies), or fail naming its holder."""
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise WorkDirError(f"{what} is in use by another bild-jobs process ({f.read().strip()}); "
                               "wait for it, or stop it first") from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            raise WorkDirError(f"{what}: the file system of {lock_file.parent} does not support file locks "
                               f"({e.strerror}): mount it with locks (Lustre: -o flock; NFS: with lockd running) "
                               "or put it on a local disk") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        yield
