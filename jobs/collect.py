"""Collect: finished shards -> one output file in input order, issues.tsv, scores, manifest."""
from __future__ import annotations

from pathlib import Path

from bild_fairseq.scoring import Score, score_task
from jobs import manifest
from jobs.config import RunConfig
from jobs.shards import read_lines, scan
from jobs.workdir import WorkDir, atomic_writer


class CollectError(RuntimeError):
    """Not every shard is done, or a shard's output does not match its line range."""


def concatenate(wd: WorkDir, cfg: RunConfig, output: Path) -> None:
    """Write the shards' outputs to ``output`` (atomically), after checking each against its record."""
    damaged = [(i, problem) for i in range(cfg.shards) if (problem := wd.damage(i, cfg.hash))]
    if damaged:
        raise CollectError("\n".join(f"shard {i}: {problem}" for i, problem in damaged)
                           + "\nnot collected: rerun the same `bild-jobs run` command to recompute "
                           + ("it" if len(damaged) == 1 else "them"))
    missing = [i for i in range(cfg.shards) if not wd.is_done(i, cfg.hash)]
    if missing:
        raise CollectError(f"{len(missing)} of {cfg.shards} shard(s) are not done ({_ids(missing)}): "
                           f"rerun the same `bild-jobs run` command to finish them (`bild-jobs status {wd.root}`)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(output, "wb") as out:
        for i, lines in enumerate(cfg.ranges()):
            with open(wd.output(i), "rb") as f:
                count = 0
                for line in f:
                    out.write(line)
                    count += 1
            if count != len(lines):
                raise CollectError(f"{wd.output(i)} has {count} lines, shard {i} covers {len(lines)}: "
                                   f"delete it and {wd.record_path(i)}, then rerun to recompute the shard")


def write_issues(wd: WorkDir, cfg: RunConfig) -> int:
    """``issues.tsv``: 1-based input line, kind, detail; returns the number of issues."""
    count = 0
    with atomic_writer(wd.issues) as f:
        f.write("line\tkind\tdetail\n")
        for i in range(cfg.shards):
            for line, kind, detail in wd.read_record(i).issues:
                f.write(f"{line + 1}\t{kind}\t{detail}\n")
                count += 1
    return count


def check_reference(cfg: RunConfig, ref: Path) -> None:
    """Refuse a reference that is not line-aligned with the input (before decoding, not after)."""
    lines = scan(ref).lines
    if lines != cfg.lines:
        raise CollectError(f"--ref {ref} has {lines} lines, the input has {cfg.lines}: "
                           "a reference must be line-aligned with the input")


def score(cfg: RunConfig, output: Path, ref: Path) -> list[Score]:
    """The task's metrics (BLEU+chrF or ROUGE) of ``output`` against the line-aligned ``ref``."""
    return score_task(cfg.task, read_lines(output), read_lines(ref))


def collect(wd: WorkDir, cfg: RunConfig, output: Path, ref: Path | None = None, last_run: dict | None = None) -> dict:
    """Write the output, issues and manifest (with ``last_run``: what the run that just ended
    did, as :func:`jobs.runner.run_job` measures it); returns the manifest."""
    if ref is not None:
        check_reference(cfg, ref)
    concatenate(wd, cfg, output)
    write_issues(wd, cfg)
    previous = manifest.read(wd) or {}
    extra = {"executor": previous.get("executor"), "output": str(output.absolute()), "issues_file": str(wd.issues)}
    if last_run is not None:
        extra["last_run"] = last_run
    if ref is not None:
        extra["scores"] = [s.to_dict() for s in score(cfg, output, ref)]
        extra["reference"] = str(ref.absolute())
    result = manifest.build(wd, cfg, **extra)
    manifest.write(wd, result)
    return result


def _ids(shards: list[int], limit: int = 20) -> str:
    shown = ", ".join(map(str, shards[:limit]))
    return f"shards {shown}" + (f" and {len(shards) - limit} more" if len(shards) > limit else "")
