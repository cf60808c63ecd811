"""``manifest.json``: one document that says what a run did, shard by shard and in total.

It is derived from ``config.json`` and the shard records every time it is written, so it can
never disagree with them; the driver rewrites it as shards finish, ``collect`` adds the output
path and scores.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, fields
from typing import Iterable

from bild_fairseq.stats import BildStats
from jobs.config import RunConfig
from jobs.workdir import ShardRecord, WorkDir, write_atomic

MANIFEST_FORMAT = 1
_COUNTS = {f.name for f in fields(BildStats)}


def merge_stats(parts: Iterable[dict]) -> dict:
    """Sum decoding statistics; the ratios (big-token share, tokens per big call) are recomputed
    from the sums, as averaging per-shard ratios would weight small shards like large ones."""
    total = BildStats()
    for part in parts:
        total.add(BildStats(**{k: v for k, v in part.items() if k in _COUNTS}))
    return total.to_dict()


def shard_entry(wd: WorkDir, index: int, lines: range, record: ShardRecord | None, config_hash: str) -> dict:
    entry = {"index": index, "start": lines.start, "stop": lines.stop, "lines": len(lines)}
    if record is None or record.config_hash != config_hash:
        return {**entry, "status": "pending"}
    entry.update(status=record.status, attempt=record.attempt, host=record.host, log=record.log,
                 started=record.started, finished=record.finished, timings=record.timings,
                 issues=dict(Counter(kind for _, kind, _ in record.issues)), stats=record.stats)
    if record.status == "running":
        entry["lines_done"] = wd.lines_in_progress(index)
    if record.error:
        entry["error"] = record.error
    return entry


def build(wd: WorkDir, cfg: RunConfig, **extra) -> dict:
    """The manifest as of now; ``extra`` adds top-level keys (executor, output, scores)."""
    records = {i: wd.read_record(i) for i in range(cfg.shards)}
    shards = [shard_entry(wd, i, r, records[i], cfg.hash) for i, r in enumerate(cfg.ranges())]
    done = [records[s["index"]] for s in shards if s["status"] == "done"]
    started = [r.started for r in done]
    finished = [r.finished for r in done]
    worker_seconds = sum(r.timings.get("total", 0.0) for r in done)
    wall = max(finished) - min(started) if done else 0.0
    lines_done = sum(r.lines for r in done)
    used = {json.dumps(r.decoding, sort_keys=True) for r in done}
    return {
        "format": MANIFEST_FORMAT,
        "config_hash": cfg.hash,
        "updated": time.time(),
        "input": {"path": cfg.input, "lines": cfg.lines, "sha256": cfg.input_sha256},
        "pair_dir": cfg.pair_dir,
        "task": cfg.task,
        "decoding": {"requested": asdict(cfg.decoding),
                     # what the workers actually used; several entries would mean mixed settings
                     "used": [json.loads(u) for u in sorted(used)]},
        **extra,
        "shards": shards,
        "totals": {
            "shards": dict(Counter(s["status"] for s in shards)),
            "lines": cfg.lines,
            "lines_done": lines_done,
            "issues": dict(Counter(kind for r in done for _, kind, _ in r.issues)),
            "stats": merge_stats(r.stats for r in done),
            "worker_seconds": worker_seconds,
            "wall_seconds": wall,
            "lines_per_second": lines_done / wall if wall > 0 else None,
        },
    }


def write(wd: WorkDir, manifest: dict) -> None:
    write_atomic(wd.manifest, json.dumps(manifest, indent=1) + "\n")


def read(wd: WorkDir) -> dict | None:
    return json.loads(wd.manifest.read_text(encoding="utf-8")) if wd.manifest.is_file() else None
