"""The packages import only downward: tools (jobs.tuning) -> runner (jobs) -> plugin (bild_fairseq)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package folder -> the packages its modules must not import
FORBIDDEN = {"bild_fairseq": ("jobs",), "bild_fairseq/engines": ("jobs",), "jobs": ("jobs.tuning",),
             "jobs/executors": ("jobs.tuning",)}
#: the largest file git may track outside the pair directories (resume points and intermediate
#: weights belong on the user's storage, not in every clone)
MAX_TRACKED_BYTES = 25 * 2**20


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_modules_import_only_downward(folder):
    upward = {f"{path.relative_to(ROOT)} imports {name}"
              for path in (ROOT / folder).glob("*.py") for name in imported_modules(path)
              for banned in FORBIDDEN[folder] if name == banned or name.startswith(banned + ".")}
    assert not upward


def test_the_tools_reach_the_runner_through_functions_not_its_cli():
    assert not {f"{path.name} imports {name}" for path in (ROOT / "jobs/tuning").glob("*.py")
                for name in imported_modules(path) if name == "jobs.cli"}


def test_no_large_file_is_tracked_outside_the_pair_directories():
    import subprocess

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    large = [f"{name} ({(ROOT / name).stat().st_size / 2**20:.0f} MiB)" for name in (f.decode() for f in files if f)
             if not name.startswith("data/pairs/") and (ROOT / name).is_file()
             and (ROOT / name).stat().st_size > MAX_TRACKED_BYTES]
    assert not large, f"files over 25 MiB outside data/pairs/ (keep them out of git): {large}"
