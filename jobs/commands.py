"""External commands (fairseq-preprocess, fairseq-train) run with their output in a log file,
failing with the log's last lines: what binarize and distill start."""
from __future__ import annotations

import subprocess
from pathlib import Path


class CommandFailed(RuntimeError):
    """An external command (fairseq-preprocess, fairseq-train) failed; the message ends with its log."""


def run_logged(cmd: list[str], log: Path, what: str, env: dict | None = None) -> None:
    """Run ``cmd`` with its output appended to ``log``; on failure raise with the log's last lines."""
    with open(log, "a", encoding="utf-8") as f:
        print(" ".join(cmd), file=f, flush=True)
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise CommandFailed(f"{what} failed (exit {code}); {log} ends:\n  " + "\n  ".join(tail))
