"""bild-jobs: translate or summarize large corpora with a BiLD pair, sharded and resumable.

\b
  bild-jobs run INPUT --pair DIR --output OUT [--executor local|slurm] ...
  bild-jobs status WORKDIR
  bild-jobs collect WORKDIR [--output OUT] [--ref REF]
  bild-jobs binarize INPUT --pair DIR --out DATA_BIN [--ref REF]   (for fairseq-generate)
  bild-jobs plugin-dir   (for fairseq-generate --user-dir $(bild-jobs plugin-dir) --bild ...)
  bild-jobs pair init OUT --big BIG.pt --small SMALL.pt --dicts DIR ...   (your own models)
  bild-jobs bench | sweep | distill ...   (evaluation and tuning)

Each command's --help lists its options.
"""
from __future__ import annotations

import importlib
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from jobs.config import RunConfig
    from jobs.executors.base import Executor
    from jobs.executors.slurm import SlurmExecutor
    from jobs.workdir import WorkDir

# The commands import the runner (and through it fairseq and torch) when they run, not when the
# group is built: ``bild-jobs --help`` and every ``COMMAND --help`` answer at once.

PATH = click.Path(path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _echo(message: str) -> None:
    click.echo(message, err=True)


def _summary(result: dict, wd: WorkDir) -> str:
    totals = result["totals"]
    issues = ", ".join(f"{n} {kind}" for kind, n in sorted(totals["issues"].items()))
    lines = [f"wrote {result['output']}: {totals['lines_done']} lines"
             + (f" ({issues}; see {result['issues_file']})" if issues else "")]
    stats = totals["stats"]
    if stats.get("tokens"):
        lines.append(f"decoding: {stats['tokens']} tokens, big-model share {100 * stats['big_token_share']:.1f}%, "
                     f"{stats['fallbacks']} fallbacks, {stats['rollbacks']} rollbacks, "
                     f"{stats['big_passes_per_token']:.3f} big-model passes per token")
    last = result.get("last_run")
    if last is not None and last["shards"] == 0:
        lines.append("time: nothing decoded in this run (every shard was done before)")
    elif last is not None:
        lines.append(f"time: this run decoded {last['lines']} lines ({last['shards']} shard(s)) in "
                     f"{last['wall_seconds']:.1f} s wall, {last['lines_per_second']:.1f} lines/s")
    elif totals["lines_per_second"]:
        lines.append(f"time: {totals['wall_seconds']:.1f} s wall, {totals['lines_per_second']:.1f} lines/s")
    lines += [f"{s['name']} = {s['value']:.2f}  ({s['signature']})" for s in result.get("scores", [])]
    if last is not None and last.get("mode_note"):
        lines.append(last["mode_note"])
    lines.append(f"manifest: {wd.manifest}")
    return "\n".join(lines)


#: the evaluation and tuning commands: name -> (module:command, the line ``bild-jobs --help`` shows)
TOOLS = {
    "bench": ("jobs.tuning.bench:bench", "Time BiLD against stock fairseq and the big and small models."),
    "sweep": ("jobs.tuning.sweep:sweep_command",
              "Sweep BiLD thresholds on a dev set; recommend the fastest within a quality budget."),
    "distill": ("jobs.tuning.distill:distill",
                "Align the small model with the big one by sequence-level distillation."),
    "pair": ("jobs.tuning.pairinit:pair",
             "pair init: a pair directory from your own checkpoints, checked and tuned on a dev set."),
}


class Commands(click.Group):
    """The runner's commands, plus the tools' commands (``TOOLS``) imported only when invoked."""

    def invoke(self, ctx: click.Context):
        # Before anything imports fairseq: its text_to_speech module calls logging.basicConfig at
        # DEBUG, which would print fairseq's INFO chatter (the tensorboardX notice) on every call.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return super().invoke(ctx)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *TOOLS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in TOOLS:
            return super().get_command(ctx, name)
        module, attr = TOOLS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, cmd.get_short_help_str(limit=formatter.width)) for name, cmd in self.commands.items()]
        rows += [(name, short) for name, (_, short) in TOOLS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=Commands, help=__doc__)
def main() -> None:
    pass


@main.command(short_help="Decode INPUT into OUTPUT, line-aligned, sharded over local workers or Slurm.")
@click.argument("input_path", metavar="INPUT", type=EXISTING_FILE)
@click.option("--pair", "pair_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="pair directory: big.pt, small.pt, dictionaries, BPE codes, pair.json")
@click.option("--output", "-o", required=True, type=PATH, help="output file, line-aligned with INPUT")
@click.option("--workdir", "-w", type=PATH, help="run state (shards, logs, manifest) [OUTPUT.work]")
@click.option("--shards", type=click.IntRange(min=1), help="split INPUT into N line ranges "
              "[at least one per worker, at most 100,000 lines each; on resume: as before]")
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True)
@click.option("--workers", type=click.IntRange(min=1),
              help="local: worker processes [one per GPU; without GPUs, one per 4 cores]; "
              "slurm: shards running at once [no limit]")
@click.option("--bild", "mode", flag_value="bild", help="decode with BiLD [the pair's measured default "
              "(pair.json's \"run\"), else BiLD; any BiLD option implies --bild]")
@click.option("--big-only", "mode", flag_value="big", help="baseline: the big model alone")
@click.option("--small-only", "mode", flag_value="small", help="baseline: the small model alone")
@click.option("--small-checkpoint", help="small model file in the pair directory [pair.json's], e.g. small-aligned.pt")
@click.option("--bild-exact", is_flag=True, help="roll back on any disagreement: output equals the big model's")
@click.option("--fallback-threshold", type=float, help="BiLD fallback threshold [pair.json's]")
@click.option("--rollback-threshold", type=float, help="BiLD rollback threshold [pair.json's]")
@click.option("--max-small-steps", type=int, help="BiLD max consecutive small-model steps [pair.json's]")
@click.option("--wait-share", type=click.FloatRange(0, 1), help="BiLD batch policy: run the big model once this "
              "share of a batch's unfinished sentences waits for it (0: whenever one does) [pair.json's]")
@click.option("--max-wait", type=click.IntRange(min=1), help="BiLD batch policy: ... or once a sentence has waited "
              "this many iterations [pair.json's]")
@click.option("--verify-drafting/--no-verify-drafting", default=None, help="BiLD batch policy: each big pass also "
              "checks the drafting sentences' tokens [pair.json's]")
@click.option("--beam", type=click.IntRange(min=1), default=1, show_default=True,
              help="beam size (--big-only/--small-only only)")
@click.option("--max-len-a", type=float, help="max output length a*source+b [pair.json's]")
@click.option("--max-len-b", type=int, help="max output length a*source+b [pair.json's]")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]),
              help="both models' precision: fp16 needs a GPU, bf16 runs anywhere [fp32]")
@click.option("--fp16", is_flag=True, help="the same as --precision fp16")
@click.option("--no-repeat-ngram-size", type=click.IntRange(min=0), help="never repeat an n-gram of this size "
              "(fairseq's option; for models that loop on unfamiliar text) [pair.json's, else 0: off]")
@click.option("--engine", type=click.Choice(["torch", "onnxruntime"]),
              help="runtime of greedy decoding (fairseq-generate's --bild-engine): onnxruntime runs both models "
              "as exported ONNX graphs on the CPU [pair.json's measured default, else torch]")
@click.option("--int8/--no-int8", default=None, help="onnxruntime: 8-bit weights for both models "
              "(fairseq-generate's --bild-int8) [pair.json's measured default, else no]")
@click.option("--max-tokens", type=click.IntRange(min=1),
              help="source tokens per batch [4096 on CPUs, 16384 on GPUs: see jobs/config.py's MAX_TOKENS]")
@click.option("--max-sentences", type=click.IntRange(min=1), help="sentences per batch [no limit]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--allow-binary", is_flag=True, help="decode INPUT even if it does not look like text (over 5% "
              "NUL bytes or invalid UTF-8 in its first MiB)")
@click.option("--chunk-lines", type=click.IntRange(min=1), default=500, show_default=True,
              help="workers publish their output every N lines; a rerun resumes a shard after the last chunk")
@click.option("--ref", type=EXISTING_FILE, help="reference, line-aligned with INPUT: score with BLEU+chrF "
              "(translation) or ROUGE (summarization)")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="times to rerun a failed shard")
@click.option("--fresh", is_flag=True, help="discard the results of WORKDIR's earlier run, even with another config")
@click.option("--python", "python_cmd", default=sys.executable, show_default=True,
              help="command that runs Python for workers (e.g. a cluster's own venv, or a container exec)")
@click.option("--progress/--no-progress", default=None, help="progress bar [when stderr is a terminal]")
@click.option("--partition", help="slurm: partition")
@click.option("--time", "time_limit", help="slurm: time limit per shard, e.g. 4:00:00")
@click.option("--gpus-per-task", type=click.IntRange(min=0), default=0, show_default=True, help="slurm: GPUs per shard")
@click.option("--cpus-per-task", type=click.IntRange(min=1), help="slurm: CPUs per shard (= decoding threads)")
@click.option("--mem", help="slurm: memory per shard, e.g. 16G")
@click.option("--sbatch-option", "sbatch_options", multiple=True,
              help="slurm: extra sbatch option, verbatim, e.g. --sbatch-option=--account=nlp (repeatable)")
@click.option("--poll-interval", type=click.FloatRange(min=0, min_open=True),
              help="slurm: seconds between squeue calls, and before a task gone without a result counts as failed [30]")
@click.option("--dry-run", is_flag=True,
              help="slurm: prepare WORKDIR, print the job script and sbatch command, submit nothing")
def run(input_path: Path, pair_dir: Path, output: Path, workdir: Path | None, shards: int | None, executor: str,
        workers: int | None, mode: str, small_checkpoint: str | None, bild_exact: bool,
        fallback_threshold: float | None, rollback_threshold: float | None, max_small_steps: int | None,
        wait_share: float | None, max_wait: int | None, verify_drafting: bool | None, beam: int, max_len_a: float | None, max_len_b: int | None,
        precision: str | None, fp16: bool, no_repeat_ngram_size: int | None, engine: str | None, int8: bool | None,
        max_tokens: int | None,
        max_sentences: int | None, device: str, allow_binary: bool, chunk_lines: int, ref: Path | None, retries: int, fresh: bool, python_cmd: str,
        progress: bool | None, partition: str | None, time_limit: str | None, gpus_per_task: int,
        cpus_per_task: int | None, mem: str | None, sbatch_options: tuple[str, ...], poll_interval: float | None,
        dry_run: bool) -> None:
    """Decode INPUT (plain, .gz or .xz; one sentence or document per line) into OUTPUT, line-aligned."""
    from bild_fairseq.config import BildOptionError
    from bild_fairseq.pairdir import PairDirError
    from bild_fairseq.precision import check_precision
    from jobs.collect import CollectError
    from jobs.config import MAX_TOKENS, ConfigError, Decoding
    from jobs.executors.local import LocalExecutor, on_gpu, plan_slots
    from jobs.executors.slurm import SlurmError, SlurmExecutor, SlurmOptions
    from jobs.runner import ConfigChanged, RunFailed, RunRequest, check_request, plan_run, run_job
    from jobs.workdir import WorkDir, WorkDirError

    slurm_only = {"--partition": partition, "--time": time_limit, "--gpus-per-task": gpus_per_task,
                  "--cpus-per-task": cpus_per_task, "--mem": mem, "--sbatch-option": sbatch_options,
                  "--dry-run": dry_run, "--poll-interval": poll_interval}
    if executor != "slurm" and any(slurm_only.values()):
        given = ", ".join(name for name, value in slurm_only.items() if value)
        raise click.UsageError(f"{given}: Slurm options, for --executor slurm")
    if fp16 and precision not in (None, "fp16"):
        raise click.UsageError(f"--fp16 is --precision fp16, and --precision {precision} was given too: give one")
    precision = "fp16" if fp16 else precision or "fp32"
    wd = WorkDir(workdir or output.with_name(output.name + ".work"))
    python = shlex.split(python_cmd)
    options = SlurmOptions(partition=partition, time=time_limit, gpus_per_task=gpus_per_task,
                           cpus_per_task=cpus_per_task, mem=mem, max_parallel=workers, extra=sbatch_options)

    def make_executor(cfg: RunConfig) -> tuple[Executor, dict]:
        if executor == "local":
            return LocalExecutor(wd, python, slots), {"name": "local", "workers": len(slots)}
        return (SlurmExecutor(wd, python, options, job_name=f"bild-{cfg.hash[:8]}",
                              **({"poll_interval_s": poll_interval} if poll_interval else {})),
                {"name": "slurm", "jobs_file": str(wd.slurm / "jobs.json")})

    try:
        decoding = Decoding(mode=mode, small_checkpoint=small_checkpoint, exact=bild_exact,
                            fallback_threshold=fallback_threshold, rollback_threshold=rollback_threshold,
                            max_small_steps=max_small_steps, wait_share=wait_share, max_wait=max_wait,
                            verify_drafting=verify_drafting, beam=beam, max_len_a=max_len_a, max_len_b=max_len_b,
                             precision=precision, no_repeat_ngram_size=no_repeat_ngram_size, engine=engine, int8=int8)
        slots = plan_slots(device, workers) if executor == "local" else []
        # the workers' device: a GPU slot (local), a GPU asked of Slurm, else the CPU
        gpu = on_gpu(slots) if executor == "local" else device != "cpu" and gpus_per_task > 0
        check_precision(precision, "cuda" if gpu else "cpu")
        request = RunRequest(input=input_path, pair_dir=pair_dir, output=output, decoding=decoding, shards=shards,
                             parallel=len(slots) or workers, max_tokens=max_tokens or MAX_TOKENS["gpu" if gpu else "cpu"],
                             max_sentences=max_sentences,
                             device=device, chunk_lines=chunk_lines, allow_binary=allow_binary)
        if dry_run:
            request, spec = check_request(request, _echo)
            with wd.lock():
                cfg = plan_run(wd, request, spec, fresh, _echo)
                _print_dry_run(make_executor(cfg)[0], wd, cfg)
            return
        result = run_job(wd, request, make_executor, retries=retries, fresh=fresh, ref=ref, echo=_echo,
                         progress=progress if progress is not None else sys.stderr.isatty())
    except (ConfigError, BildOptionError) as e:
        raise click.UsageError(str(e)) from None
    except (PairDirError, ConfigChanged, RunFailed, WorkDirError, SlurmError, CollectError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(_os_error(e)) from None
    click.echo(_summary(result, wd))


def _os_error(e: OSError) -> str:
    """A full disk or a permission problem as one line naming the file."""
    where = f"{e.filename}: " if e.filename else ""
    return (f"{where}{e.strerror or e}: free space or fix permissions, then rerun the same command "
            "(finished shards are kept)")


def _print_dry_run(executor: SlurmExecutor, wd: WorkDir, cfg: RunConfig) -> None:
    todo = [i for i in range(cfg.shards) if not wd.is_done(i, cfg.hash)]
    script = executor.write_script()
    click.echo(script.read_text(), nl=False)
    if todo:
        click.echo(f"# to submit the {len(todo)} shard(s) not done yet:\n# {shlex.join(executor.sbatch_command(todo))}")
    else:
        click.echo("# every shard is done: `bild-jobs collect` writes the output")


@main.command(short_help="Show the state of each shard of a run.")
@click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def status(workdir: Path) -> None:
    """Show each shard of WORKDIR's run: pending, running, done or failed (Slurm: from squeue too)."""
    from jobs.config import RunConfig
    from jobs.executors.slurm import SlurmError
    from jobs.status import shard_states, status_table
    from jobs.workdir import WorkDir

    wd = WorkDir(workdir)
    if not wd.config.is_file():
        raise click.ClickException(f"{workdir} is not a bild-jobs work directory (no config.json)")
    try:
        cfg = RunConfig.load(wd.config)
        click.echo(status_table(wd, cfg, shard_states(wd, cfg)))
    except SlurmError as e:
        raise click.ClickException(str(e)) from None


@main.command(name="collect", short_help="Write the finished shards' output in input order; score it.")
@click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "-o", type=PATH, help="output file [the run's --output]")
@click.option("--ref", type=EXISTING_FILE, help="reference to score against, line-aligned with the input")
def collect_command(workdir: Path, output: Path | None, ref: Path | None) -> None:
    """Concatenate WORKDIR's finished shards into the output, in input order; write the manifest."""
    from jobs.collect import CollectError, collect
    from jobs.config import RunConfig
    from jobs.workdir import WorkDir, WorkDirError

    wd = WorkDir(workdir)
    if not wd.config.is_file():
        raise click.ClickException(f"{workdir} is not a bild-jobs work directory (no config.json)")
    try:
        with wd.lock():
            cfg = RunConfig.load(wd.config)
            click.echo(_summary(collect(wd, cfg, output or Path(cfg.output), ref), wd))
    except (WorkDirError, CollectError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(_os_error(e)) from None


@main.command(short_help="Make a fairseq DATA_BIN from raw text with the pair's own tokenization and BPE.")
@click.argument("input_path", metavar="INPUT", type=EXISTING_FILE)
@click.option("--pair", "pair_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", "destdir", required=True, type=PATH,
              help="the data directory: new, empty, or an earlier binarize output (only its files are replaced)")
@click.option("--ref", type=EXISTING_FILE, help="references, line-aligned with INPUT (fairseq-generate then scores)")
@click.option("--split", type=click.Choice(["test", "valid", "train"]), default="test", show_default=True,
              help="the split fairseq-preprocess writes (fairseq-generate --gen-subset)")
def binarize(input_path: Path, pair_dir: Path, destdir: Path, ref: Path | None, split: str) -> None:
    """Encode INPUT (plain, .gz or .xz) as the pair's models were trained (pair.json's text pipeline:
    Moses without XML escaping and BPE, SentencePiece, or pre-split) and binarize it with the pair's dictionaries into DATA_BIN,
    for `fairseq-generate DATA_BIN --user-dir $(bild-jobs plugin-dir) --bild ...`. Every line is kept."""
    import tempfile

    from bild_fairseq.pairdir import PairDirError, PairSpec
    from jobs.binarize import BinarizeError, binarize as make_data_bin
    from jobs.commands import CommandFailed
    from jobs.shards import read_lines

    try:
        spec = PairSpec.load(pair_dir)
        sources = read_lines(input_path)
        targets = read_lines(ref) if ref is not None else None
        if targets is not None and len(targets) != len(sources):
            raise click.UsageError(f"--ref {ref} has {len(targets)} lines, INPUT has {len(sources)}: "
                                   "a reference must be line-aligned with the input")
        with tempfile.TemporaryDirectory(prefix="bild-binarize-") as scratch:
            make_data_bin(spec, {split: (sources, targets)}, destdir, Path(scratch))
    except (PairDirError, CommandFailed, BinarizeError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(_os_error(e)) from None
    from bild_fairseq.config import DEFAULTS, THRESHOLDS
    from bild_fairseq.pairdir import GENERATION_DEFAULTS
    from jobs.plugin import plugin_dir

    # what `bild-jobs run --bild` decodes with: the pair's thresholds and generation settings
    settings = {**{f"bild_{k}": v for k, v in {**DEFAULTS, **spec.bild}.items() if k in THRESHOLDS},
                **GENERATION_DEFAULTS, **spec.generation}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
    remove = "sentencepiece" if spec.sides()["target"]["tokenizer"] == "sentencepiece" else "subword_nmt"
    click.echo(f"wrote {destdir}: {len(sources)} lines ({split} split); decode it with\n"
               f"  fairseq-generate {destdir} --user-dir {plugin_dir()} --path {spec.directory / spec.big} "
               f"--bild --bild-small-path {spec.directory / spec.small} {flags} --gen-subset {split} --beam 1 "
               f"--remove-bpe {remove}"
               + ("" if spec.task != "translation" else f" --source-lang {spec.source_lang} --target-lang "
                  f"{spec.target_lang}"))


@main.command(name="plugin-dir", short_help="Print the plugin's directory, for fairseq's --user-dir.")
def plugin_dir_command() -> None:
    """Print the absolute path of the bild_fairseq plugin: fairseq resolves --user-dir against the
    current directory, so `fairseq-generate ... --user-dir $(bild-jobs plugin-dir) --bild` works
    from any directory."""
    from jobs.plugin import plugin_dir

    click.echo(plugin_dir())
