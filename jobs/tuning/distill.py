"""`bild-jobs distill`: align the small model with the big one (sequence-level distillation).

BiLD is fast when the small model agrees with the big one: fewer fallbacks and rollbacks. The
paper fine-tunes the small model on the big model's own outputs. One command does it all:

\b
  1. the big model decodes the training sources greedily, through `bild-jobs run --big-only`
     (sharded and resumable like any run: rerunning this command picks up where it stopped);
  2. `fairseq-train` fine-tunes the small model on (source, big output) (with --word-kd, also on
     the big model's next-token distributions), starting from the
     pair's small checkpoint, with the same architecture and dictionaries (or, with
     --student-layers, from a student made of the big model's own layers; with --share-encoder,
     from the big model's encoder, frozen, and the small model's decoder); its validation set
     is the dev sources with the big model's outputs (what the small model should imitate; the
     references would make the least-aligned checkpoint "best");
  3. the aligned model is compared with the pair's small model on the dev set in the format of
     `bild-jobs bench`: agreement with the big model, fallback/rollback rates, BiLD speedup.

\b
    bild-jobs distill --pair data/pairs/deen --train-source data/corpora/lohelp.de-en.train.de.xz \\
        --dev-source data/corpora/lohelp.de-en.valid.de.xz --dev-ref data/corpora/lohelp.de-en.valid.en.xz \\
        --workdir data/work/deen-distill [--limit 20000] [--max-update 2000] [--install]
        [--student-layers 0/0-3]    # the big decoder's layer 0 and its encoder layers 0-3
        [--share-encoder [--decoder-layers 2] [--fit-lines 2000]]   # decoder only, on the big model's encoder

Step 1 is shared by every student distilled in one work directory; steps 2 and 3 run in
WORKDIR/NAME-STEM/, so several students can train from one teacher decoding at once. Writes
WORKDIR/NAME (--name, default small-aligned.pt), WORKDIR/NAME-STEM/report.{json,md}; --install copies
the model into the pair directory (use it with --small-checkpoint NAME). It starts from --from
(default: pair.json's small model, which in the shipped pairs is already small-aligned.pt: give
--from small.pt and another --name to distil again). A NAME the pair directory already has is
refused unless --replace; --install then keeps the old file as NAME.replaced-TIME.pt.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import click

from bild_fairseq.checkpoints import CheckpointError, export_for_inference, last_interval_checkpoints, model_settings
from bild_fairseq.config import BildOptionError
from bild_fairseq.pairdir import PairDirError, PairSpec
from bild_fairseq.precision import FAIRSEQ_FLAGS, PRECISIONS, check_precision
from bild_fairseq.scoring import PRIMARY_METRIC
from jobs.binarize import BinarizeError, binarize
from jobs.commands import CommandFailed, run_logged
from jobs.plugin import plugin_dir
from jobs.collect import CollectError
from jobs.config import MAX_TOKENS, ConfigError, Decoding
from jobs.executors.local import LocalExecutor, on_gpu, plan_slots
from jobs.runner import ConfigChanged, RunFailed, RunRequest, run_job
from jobs.shards import read_lines
from jobs.tuning.bench import SmallModel, Suite, run_suite
from jobs.tuning.benchreport import render_suite
from jobs.tuning.measure import Batching, MeasureError
from jobs.tuning.shrink import ShrinkError, adopt_encoder, fit_cross_attention, graft, parse_layers, shrink
from jobs.workdir import WorkDir, WorkDirError
from jobs.worker import resolve_device

FINETUNE = ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr-scheduler", "inverse_sqrt",
            "--warmup-init-lr", "1e-07", "--label-smoothing", "0.1",
            "--no-epoch-checkpoints", "--no-progress-bar", "--log-interval", "50",
            "--num-workers", "0", "--seed", "1", "--max-epoch", "1000"]


class DistillError(RuntimeError):
    """A step of the distillation failed; the message names the step and its log."""


def teacher_outputs(spec: PairSpec, source: Path, limit: int | None, workdir: Path, workers: int | None,
                    device: str, name: str, precision: str = "fp32") -> tuple[Path, Path]:
    """Step 1: the big model's greedy outputs for ``source`` (or its first ``limit`` lines), via
    the batch runner, as WORKDIR/NAME.out; returns the source file it decoded and the output file."""
    if limit is not None:
        head = workdir / f"{name}.source"
        head.write_text("".join(line + "\n" for line in read_lines(source, limit)), encoding="utf-8")
        source = head
    output = workdir / f"{name}.out"
    wd, slots = WorkDir(workdir / f"{name}.work"), plan_slots(device, workers)
    request = RunRequest(input=source, pair_dir=spec.directory, output=output, decoding=Decoding(mode="big", precision=precision),
                         parallel=len(slots), device=device, max_tokens=MAX_TOKENS["gpu" if on_gpu(slots) else "cpu"])
    run_job(wd, request, lambda cfg: (LocalExecutor(wd, [sys.executable], slots), {"name": "local",
                                                                                  "workers": len(slots)}),
            echo=lambda message: click.echo(message, err=True))
    return source, output


def distillation_data(spec: PairSpec, train: tuple[list[str], list[str]], valid: tuple[list[str], list[str]],
                      workdir: Path) -> Path:
    """Step 2a: tokenize + BPE like the pair's training data, binarize with the pair's dictionaries.
    Pairs with an empty side (an empty input line) are left out."""
    splits = {}
    for split, (sources, targets) in (("train", train), ("valid", valid)):
        kept = [(s, t) for s, t in zip(sources, targets) if s.strip() and t.strip()]
        if not kept:
            raise DistillError(f"no {split} pairs left with text on both sides")
        splits[split] = ([s for s, _ in kept], [t for _, t in kept])
    return binarize(spec, splits, workdir / "bin", workdir / "bpe")


def model_flags(checkpoint: Path) -> list[str]:
    """The ``fairseq-train`` options that rebuild ``checkpoint``'s architecture exactly (read
    from the checkpoint's own model config, through the architecture's own argument parser)."""
    import torch
    from fairseq.models import ARCH_MODEL_REGISTRY

    model = model_settings(torch.load(checkpoint, map_location="cpu")["cfg"]["model"])  # weights-only, allow-list
    arch = model.get("arch") or model.get("_name")
    if arch not in ARCH_MODEL_REGISTRY:
        raise DistillError(f"{checkpoint}: unknown architecture {arch!r}")
    parser = argparse.ArgumentParser()
    ARCH_MODEL_REGISTRY[arch].add_args(parser)
    flags = ["--arch", arch]
    for action in parser._actions:
        value = model.get(action.dest)
        if not action.option_strings or value is None or action.dest == "help":
            continue
        if isinstance(action, argparse._StoreTrueAction):
            flags += [action.option_strings[0]] if value else []
        else:
            flags += [action.option_strings[0], str(value)]
    return flags


def criterion_flags(spec: PairSpec, kd_weight: float) -> list[str]:
    """Sequence-level distillation (cross-entropy on the big model's outputs), or with ``kd_weight``
    > 0 also word-level: the big model's distributions as soft targets (bild_fairseq.distillation)."""
    if not kd_weight:
        return ["--criterion", "label_smoothed_cross_entropy"]
    return ["--criterion", "bild_distillation", "--teacher", str(spec.model_path("big").resolve()),
            "--kd-weight", str(kd_weight)]


def finetune(spec: PairSpec, small: Path, bin_dir: Path, workdir: Path, options: list[str], threads: int | None,
             frozen_encoder: bool = False) -> Path:
    """Step 2b: fine-tune ``small`` on the distilled data (``frozen_encoder``: its decoder only);
    returns the best checkpoint. Rerun with the same work directory, fairseq resumes from its
    checkpoint_last.pt."""
    from bild_fairseq.frozen_encoder import ARCH

    save_dir = workdir / "ckpt"
    arch = model_flags(small)
    if frozen_encoder:
        arch[1] = ARCH  # the same weights and settings, trained with the encoder fixed
    cmd = ["fairseq-train", str(bin_dir), "--task", "translation", "--source-lang", spec.source_lang,
           "--target-lang", spec.target_lang, *arch, "--finetune-from-model", str(small.resolve()),
           "--user-dir", plugin_dir(), "--save-dir", str(save_dir), *FINETUNE, *options]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    run_logged(cmd, workdir / "train.log", "fairseq-train", env)
    best = save_dir / "checkpoint_best.pt"
    if not best.is_file():
        raise DistillError(f"fairseq-train ended without {best}; see {workdir / 'train.log'}")
    return best


def student(spec: PairSpec, layers: str | None, workdir: Path, start: str = "small", share_encoder: bool = False,
            decoder_layers: int | None = None) -> Path:
    """The model step 2 starts from: the pair's model ``start`` (its small model by default), or
    (``layers`` "DEC[/ENC]") the big model shrunk to those layers, or (``share_encoder``) the big
    model's encoder under ``start``'s decoder, its last layer repeated up to ``decoder_layers``."""
    if share_encoder:
        return graft(spec.model_path("big"), spec.model_path(start), workdir / "student-init.pt", decoder_layers)
    if layers is None:
        return spec.model_path(start)
    decoder, _, encoder = layers.partition("/")
    return shrink(spec.model_path("big"), workdir / "student-init.pt", parse_layers(decoder),
                  parse_layers(encoder) if encoder else None)


def evaluation_pair(spec: PairSpec, aligned: Path, workdir: Path, name: str) -> Path:
    """A pair directory of links to the pair's files plus the aligned model, so that the aligned
    model is evaluated exactly like the shipped one (before anything is installed)."""
    pair = workdir / "eval-pair"
    shutil.rmtree(pair, ignore_errors=True)
    pair.mkdir()
    for f in spec.directory.iterdir():
        if f.is_file() and f.name != name:
            (pair / f.name).symlink_to(f.resolve())
    (pair / name).symlink_to(aligned.resolve())
    return pair


def check_names(spec: PairSpec, start: str, name: str, replace: bool) -> None:
    """Refuse, before any work, an aligned model that would be compared with itself (``name`` is
    the model it starts from) or would silently take the place of one of the pair's models."""
    if name == start:
        raise click.UsageError(f"--name {name} is the --from model, the one it starts from and is compared "
                               f"with: give the aligned model another --name, e.g. {Path(name).stem}-2.pt")
    if (spec.directory / name).exists() and not replace:
        raise click.UsageError(f"--name {name}: {spec.directory} already has that model; give another --name, or "
                               "--replace to replace it (--install keeps the old file beside it)")


def install_model(aligned: Path, target: Path) -> Path | None:
    """Copy ``aligned`` to ``target`` atomically; an existing ``target`` is kept, renamed with the
    time (returned), so installing never destroys a model."""
    tmp = target.with_name(f".{target.name}.installing")
    shutil.copyfile(aligned, tmp)
    kept = None
    if target.exists():
        kept = target.with_name(f"{target.stem}.replaced-{time.strftime('%Y%m%d-%H%M%S')}{target.suffix}")
        target.rename(kept)
    tmp.rename(target)
    return kept


def comparison(suite: dict, unaligned: SmallModel, aligned: SmallModel, default_small: str) -> list[str]:
    """Markdown: the unaligned and the aligned small model side by side (first batching)."""
    rows = {r["variant"]: r for r in suite["rows"] if r["batching"] == suite["rows"][0]["batching"]}
    metric = PRIMARY_METRIC[suite["task"]]
    header = ["small model", "agreement", f"small alone {metric}", "BiLD default: × big", "fallback", "rollback",
              "big tokens", "BiLD exact: × big"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in (unaligned, aligned):
        label, s = model.checkpoint or default_small, model.suffix
        share = suite["agreement"][label]
        d, e = rows[f"bild-default{s}"], rows[f"bild-exact{s}"]
        lines.append(f"| {label} | {100 * share:.1f}% | {rows['small' + s]['scores'][metric]:.2f} | "
                     f"{d['speedup_vs_big']:.2f} | {100 * d['fallback_rate']:.1f}% | {100 * d['rollback_rate']:.1f}% | "
                     f"{100 * d['big_token_share']:.1f}% | {e['speedup_vs_big']:.2f} |")
    return lines


@click.command(name="distill", help=__doc__)
@click.option("--pair", "pair_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--train-source", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="training sources to distil on (plain, .gz or .xz)")
@click.option("--dev-source", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dev-ref", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--workdir", "-w", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--limit", type=click.IntRange(min=1), help="distil on the first N training lines [all]")
@click.option("--workers", type=click.IntRange(min=1), help="step 1: worker processes [the runner's default]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="every step: the teacher's decoding, fairseq-train's --fp16/--bf16, the comparison (fp16: GPU only)")
@click.option("--max-update", type=click.IntRange(min=1), default=2000, show_default=True,
              help="step 2: fine-tuning updates")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="step 2: wall-clock limit of the fine-tuning")
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--warmup-updates", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True),
              help="step 2: the student's dropout; 0 suits a student that underfits its teacher "
                   "(training loss above validation loss) [the small model's own]")
@click.option("--average", type=click.IntRange(min=1), default=1, show_default=True,
              help="step 2: ship the mean of the last N interval checkpoints (one per 500 updates) instead of "
                   "the lowest-validation-loss one; averaging smooths a flat end of training")
@click.option("--word-kd", "kd_weight", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="step 2: weight of the big model's next-token distributions as soft targets (KL), against "
                   "the cross-entropy on its outputs; each update also runs the big model forward (no gradient)")
@click.option("--threads", type=click.IntRange(min=1), help="step 2: training threads [OMP_NUM_THREADS]")
@click.option("--eval-limit", type=click.IntRange(min=1), help="step 3: first N dev lines [all]")
@click.option("--batch", "batch_texts", multiple=True, default=("1",), show_default=True,
              help="step 3: batching(s), as for bild-jobs bench")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True, help="step 3: timed passes")
@click.option("--student-layers", metavar="DEC[/ENC]",
              help="step 2: start from the big model's own layers instead of the pair's small model: the big "
                   "decoder's layers DEC (e.g. 0 or 0,4) and encoder layers ENC (e.g. 0-1) [whole encoder]")
@click.option("--share-encoder", is_flag=True, help="step 2: the student is the big model's encoder (frozen: it "
              "runs once for both models when decoding) under the --from model's decoder")
@click.option("--decoder-layers", type=click.IntRange(min=1), help="with --share-encoder: the student decoder's "
              "layers (the --from decoder's last layer repeated) [the --from model's]")
@click.option("--fit-lines", type=click.IntRange(min=0), default=2000, show_default=True,
              help="with --share-encoder: fit the decoder's cross-attention to the big encoder's states on this "
                   "many training sources before training (0: keep the --from model's as they are)")
@click.option("--from", "start", metavar="FILE", help="step 2: the pair's model file to fine-tune [pair.json's small]")
@click.option("--name", default="small-aligned.pt", show_default=True,
              help="file name of the aligned model; not the --from model, nor (without --replace) any file of the pair")
@click.option("--replace", is_flag=True, help="allow a --name the pair directory already has")
@click.option("--install", is_flag=True, help="copy the aligned model into the pair directory (an older file of "
              "that name is kept as NAME.replaced-TIME.pt)")
def distill(pair_dir: Path, train_source: Path, dev_source: Path, dev_ref: Path, workdir: Path, limit: int | None,
            workers: int | None, device: str, precision: str, max_update: int, hours: float, lr: float, warmup_updates: int,
            max_tokens: int, dropout: float | None, average: int, kd_weight: float, threads: int | None, eval_limit: int | None, batch_texts: tuple[str, ...], repeats: int,
            student_layers: str | None, share_encoder: bool, decoder_layers: int | None, fit_lines: int,
            start: str | None, name: str,
            replace: bool, install: bool) -> None:
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    try:
        spec = PairSpec.load(pair_dir)
        if start is not None and student_layers is not None:
            raise click.UsageError("--from and --student-layers both choose the model to fine-tune: give one")
        if share_encoder and student_layers is not None:
            raise click.UsageError("--share-encoder and --student-layers both choose the student's encoder: give one")
        if decoder_layers is not None and not share_encoder:
            raise click.UsageError("--decoder-layers shapes a --share-encoder student: add --share-encoder")
        check_precision(precision, resolve_device(device))
        start = start or spec.small
        check_names(spec, start, name, replace)
        batchings = [Batching.parse(b) for b in batch_texts]
        own = workdir / Path(name).stem  # this student's steps 2-3; step 1 is the work directory's
        own.mkdir(parents=True, exist_ok=True)
        # before step 1: a wrong layer list fails at once
        small = student(spec, student_layers, own, start, share_encoder, decoder_layers)
        if share_encoder and fit_lines:
            r2 = fit_cross_attention(small, spec.directory, start, read_lines(train_source, fit_lines))
            echo(f"the student's cross-attention refitted to the big encoder on {fit_lines} sources (R^2 {r2:.2f})")
        echo(f"1/3 the big model decodes {train_source}" + (f" (first {limit} lines)" if limit else ""))
        source, teacher = teacher_outputs(spec, train_source, limit, workdir, workers, device, "teacher", precision)
        _, dev_teacher = teacher_outputs(spec, dev_source, None, workdir, workers, device, "dev-teacher", precision)
        echo("2/3 fine-tuning the small model on the big model's outputs")
        bin_dir = distillation_data(spec, (read_lines(source), read_lines(teacher)),
                                    (read_lines(dev_source), read_lines(dev_teacher)), own)
        options = ["--lr", str(lr), "--warmup-updates", str(warmup_updates), "--max-tokens", str(max_tokens),
                   "--max-update", str(max_update), "--stop-time-hours", str(hours),
                   "--save-interval-updates", str(max(1, min(500, max_update))),
                   "--keep-interval-updates", str(average),
                   *(["--dropout", str(dropout)] if dropout is not None else []), *criterion_flags(spec, kd_weight),
                   *FAIRSEQ_FLAGS[precision]]
        best = finetune(spec, small, bin_dir, own, options, threads, share_encoder)
        aligned = export_for_inference(last_interval_checkpoints(best.parent, average), workdir / name)
        if share_encoder:
            adopt_encoder(aligned, spec.model_path("big"))
        echo(f"3/3 comparing {name} with {start} on {dev_source}")
        models = (SmallModel(None if start == spec.small else start), SmallModel(name))
        suite = Suite("dev", evaluation_pair(spec, aligned, own, name), dev_source, dev_ref, models)
        result = run_suite(suite, batchings, repeats, eval_limit, resolve_device(device), threads, False, echo,
                           engines=(("torch", False),), precision=precision)
    except (PairDirError, MeasureError, DistillError, BildOptionError, ConfigError, ConfigChanged, RunFailed,
            WorkDirError, CollectError, CommandFailed, BinarizeError, ShrinkError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    report = "\n".join(["## Aligned small model", "", *comparison(result, *models, spec.small), "",
                        *render_suite(result)])
    (own / "report.json").write_text(json.dumps({**result, "precision": precision}, indent=1) + "\n",
                                         encoding="utf-8")
    (own / "report.md").write_text(report, encoding="utf-8")
    click.echo(report)
    if install:
        kept = install_model(aligned, spec.directory / name)
        if share_encoder and name not in spec.shared_encoder:
            spec.shared_encoder.append(name)
            spec.save()
        echo(f"installed {spec.directory / name}: decode with --small-checkpoint {name}"
             + (f" (the previous one is kept as {kept})" if kept else ""))


if __name__ == "__main__":
    distill()
