"""The Slurm executor on a real one-node cluster (scripts/local-slurm.sh): array jobs, a shard
that fails once and is retried, status from squeue, collected output.

Without a cluster these tests try to start one; when that is impossible they skip, except in CI
(CI=1) or with BILD_REQUIRE_SLURM=1, where they fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.workdir import WorkDir
from jobs_fixtures import BILD_JOBS, ROOT, read_output, real_lines

pytest_plugins = ["jobs_fixtures"]
SCRIPT = ROOT / "scripts" / "local-slurm.sh"


def _required() -> bool:
    return any(os.environ.get(v, "") not in ("", "0", "false") for v in ("CI", "BILD_REQUIRE_SLURM"))


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in ("idle", "mixed", "allocated") for s in out.stdout.split())


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running cluster; one this fixture had to start is stopped again afterwards."""
    started = False
    if not _cluster_up():
        if os.geteuid() != 0:
            reason = "starting it needs root (scripts/local-slurm.sh installs packages and starts daemons)"
        else:
            done = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
            started = done.returncode == 0 and _cluster_up()
            reason = f"`{SCRIPT} start` failed: {(done.stdout + done.stderr).strip()[-2000:]}"
        if not started:
            (pytest.fail if _required() else pytest.skip)(f"no Slurm cluster: {reason}")
    yield
    if started:
        subprocess.run([str(SCRIPT), "stop"], check=True, timeout=300)


def _python_wrapper(tmp_path: Path) -> tuple[Path, Path]:
    """A ``--python`` that waits for a gate file, then fails shard 1's first attempt: a test
    double standing in for a node that loses a task."""
    gate = tmp_path / "gate"
    wrapper = tmp_path / "python-wrapper.sh"
    wrapper.write_text(f"""#!/bin/bash
while [ ! -e {gate} ]; do sleep 0.2; done
if [ "$SLURM_ARRAY_TASK_ID" = 1 ] && [ ! -e {tmp_path}/failed-once ]; then
  touch {tmp_path}/failed-once
  echo "injected failure of shard 1" >&2
  exit 3
fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper, gate


def _status(wd: WorkDir) -> str:
    result = CliRunner().invoke(main, ["status", str(wd.root)])
    assert result.exit_code == 0, result.output
    return result.output


def _wait_for(predicate, what: str, driver: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_for_job(job: str, timeout: float = 240) -> str:
    """``scontrol show job`` once the job has ended (``sbatch --wait`` polls at up to 30 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["scontrol", "show", "job", "--oneliner", job], capture_output=True, text=True).stdout
        if not any(f"JobState={s} " in state for s in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not end in {timeout} s")


def test_slurm_array_survives_its_driver_and_retries_a_failed_shard(
        slurm_cluster, tiny_pair, corpus, reference_output, tmp_path):
    src, ref = corpus
    out, wd = tmp_path / "out.en", WorkDir(tmp_path / "work")
    wrapper, gate = _python_wrapper(tmp_path)
    cmd = [str(BILD_JOBS), "run", str(src), "--pair", str(tiny_pair), "-o", str(out), "-w", str(wd.root),
           "--executor", "slurm", "--shards", "3", "--workers", "2", "--retries", "1", "--python", str(wrapper),
           "--time", "10:00", "--mem", "1G", "--cpus-per-task", "1", "--ref", str(ref), "--poll-interval", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # the array is throttled to 2 tasks at once (--workers 2): two run, one waits
        def two_running_one_pending() -> str | None:
            table = _status(wd) if (wd.slurm / "jobs.json").is_file() else ""
            return table if "2 running, 1 pending" in table else None

        table = _wait_for(two_running_one_pending, "two running shards and one pending", driver)
        first = json.loads((wd.slurm / "jobs.json").read_text())[0]["job_id"]
        assert f"slurm {first}_2 PENDING" in table
        driver.kill()  # the driver dies (logout, its own time limit): the array runs on
        driver.communicate()
        rerun = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        plan = ""
        while "shard(s) over" not in plan:
            plan = rerun.stderr.readline()
            assert plan, rerun.communicate()
        assert "0 done, 0 to run, 3 still in Slurm" in plan  # it waits for them, resubmits none
    finally:
        gate.touch()
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert read_output(out) == reference_output
    submissions = json.loads((wd.slurm / "jobs.json").read_text())
    assert [s["shards"] for s in submissions] == [[0, 1, 2], [1]]
    retry = submissions[1]["job_id"]
    assert "injected failure of shard 1" in wd.slurm_log(1, first).read_text()
    assert f"shard 1 failed (Slurm array task {first}_1 ended without a result" in stderr
    assert "retry 1 of 1" in stderr
    assert [wd.read_record(i).attempt for i in range(3)] == [1, 2, 1]
    assert wd.read_record(1).log == str(wd.slurm_log(1, retry))
    for shard, job in [(0, first), (2, first), (1, retry)]:
        assert f"shard {shard}: done" in wd.slurm_log(shard, job).read_text()

    m = json.loads(wd.manifest.read_text())
    assert m["executor"]["name"] == "slurm" and m["totals"]["shards"] == {"done": 3}
    assert {s["name"] for s in m["scores"]} == {"BLEU", "chrF"}
    final = _status(wd)
    assert "3 done, 0 running, 0 pending, 0 failed; 300/300 lines done" in final


def test_dry_run_prints_the_job_script_and_submits_nothing(tiny_pair, corpus, tmp_path):
    wd = WorkDir(tmp_path / "work")
    result = CliRunner().invoke(main, [
        "run", str(corpus[0]), "--pair", str(tiny_pair), "-o", str(tmp_path / "o.en"), "-w", str(wd.root),
        "--executor", "slurm", "--shards", "4", "--workers", "2", "--partition", "gpu", "--time", "4:00:00",
        "--gpus-per-task", "1", "--mem", "16G", "--sbatch-option=--account=nlp", "--dry-run"])
    assert result.exit_code == 0, result.output
    script = result.output
    assert script.startswith("#!/bin/bash\n")
    for line in ["#SBATCH --partition=gpu", "#SBATCH --time=4:00:00", "#SBATCH --gres=gpu:1", "#SBATCH --mem=16G",
                 "#SBATCH --account=nlp", f'exec {sys.executable} -m jobs.worker {wd.root} "$SLURM_ARRAY_TASK_ID"',
                 f"# sbatch --parsable --array=0-3%2 {wd.slurm / 'job.sh'}"]:
        assert line in script.splitlines(), line
    assert (wd.slurm / "job.sh").read_text() in script  # the file the command submits
    assert wd.config.is_file() and not (wd.slurm / "jobs.json").exists()


def test_example_sbatch_driver_runs_the_whole_job_from_inside_slurm(slurm_cluster, tiny_pair, corpus,
                                                                     reference_output, tmp_path):
    """scripts/bild-jobs.sbatch (the README's example): the driver is itself a Slurm job and
    submits the shard array from inside it."""
    src = tmp_path / "in.de"
    src.write_bytes(b"".join(line + b"\n" for line in real_lines(corpus[0], 40)))
    out, log = tmp_path / "out.en", tmp_path / "driver.log"
    job = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", str(ROOT / "scripts" / "bild-jobs.sbatch"), str(src),
         str(tiny_pair), str(out), "--shards", "2", "--time", "10:00", "--mem", "1G", "--poll-interval", "1"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "BILD_JOBS": str(BILD_JOBS), "OMP_NUM_THREADS": "1"}).stdout.strip()
    state = _wait_for_job(job)
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, log.read_text()
    assert read_output(out) == reference_output[:40]
    assert "wrote " in log.read_text() and "manifest: " in log.read_text()
    assert json.loads((tmp_path / "out.en.work" / "manifest.json").read_text())["totals"]["shards"] == {"done": 2}


def test_fresh_is_refused_while_tasks_of_the_earlier_run_are_in_slurm(slurm_cluster, tiny_pair, tmp_path):
    """Tasks of the old configuration would read the new config.json and write into shards/."""
    src, out = tmp_path / "in.de", tmp_path / "o.en"
    src.write_text("Klicken Sie auf OK.\n")
    wd = WorkDir(tmp_path / "o.en.work")
    args = ["run", str(src), "--pair", str(tiny_pair), "-o", str(out), "--workers", "1", "--device", "cpu"]
    assert CliRunner().invoke(main, args).exit_code == 0
    config = wd.config.read_text()
    job = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--time=5:00", "--mem=100M",
                          "--output", str(tmp_path / "sleep-%A_%a.out"), "--wrap", "sleep 300"],
                         capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        (wd.slurm / "jobs.json").write_text(json.dumps([{"job_id": job, "shards": [0, 1], "submitted": 0}]))
        refused = CliRunner().invoke(main, [*args, "--fallback-threshold", "0.3", "--fresh"])
        assert refused.exit_code == 1, refused.output
        assert f"still queued or running ({job}_0, {job}_1): `scancel {job}`" in refused.output
        assert wd.config.read_text() == config and wd.is_done(0, json.loads(config)["hash"])
    finally:
        subprocess.run(["scancel", job], check=True)
