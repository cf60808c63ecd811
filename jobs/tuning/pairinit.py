"""`bild-jobs pair init`: a pair directory from your own fairseq checkpoints, checked, then tuned.

\b
    bild-jobs pair init my-pair --big big.pt --small small.pt --dicts data-bin \\
        --source-lang de --target-lang en --text sentencepiece:spm.model \\
        --dev-source valid.de --dev-ref valid.en --limit 200

First the checks (jobs.tuning.paircheck), before anything is written: both checkpoints load with
--dicts's dictionaries (the target one shared), their decoders are ones BiLD supports, and the
tokenization matches the dictionaries and round-trips on a sample. Then OUT gets copies of the
checkpoints, dictionaries and tokenization files and a complete pair.json. Given a dev set, it
measures the small model's agreement with the big one, runs the threshold sweep (bild-jobs sweep)
at the runner's batching (--max-tokens 4096) into OUT/sweep, and writes the fastest BiLD
thresholds within the quality budget and the measured default mode (BiLD, or big-only when no
BiLD setting within the budget was 1.1x as fast), with the figures, into pair.json.
"""
from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import click

from bild_fairseq.config import DEFAULTS, SETTINGS, BildOptionError
from bild_fairseq.pairdir import GENERATION_DEFAULTS, PairDirError, PairSpec
from jobs.shards import read_lines
from jobs.tuning.agreement import pair_agreement
from jobs.tuning.measure import Batching, MeasureError
from jobs.tuning.paircheck import (TEXT_HELP, PairCheckError, TextFigures, check_text, load_supported,
                                   parse_text, same_dictionaries, translation_task)
from jobs.tuning.pareto import Point, recommend
from jobs.tuning.sweep import decide, grid, parse_floats, sweep, write

#: the batching `bild-jobs run` decodes with by default (its --max-tokens), which "run" is for
RUNNER_BATCHING = "tokens:4096"
#: sample lines the tokenization is checked on
SAMPLE_LINES = 100
#: least speedup over the big model that makes BiLD the default: one timing run on a shared
#: machine varies by several percent (a BiLD setting that cannot be faster, its small model
#: agreeing on 0% of tokens, once measured 1.04x)
MIN_SPEEDUP = 1.1


def check(big: Path, small: Path, dicts: Path, small_dicts: Path | None, source_lang: str, target_lang: str,
          text: dict[str, dict], samples: dict[str, list[str]], options: dict[str, str]) -> dict[str, TextFigures]:
    """Every check, before anything is written; the tokenization's figures."""
    task = translation_task(dicts, source_lang, target_lang)
    if small_dicts is not None:
        same_dictionaries(dicts, small_dicts, (source_lang, target_lang))
    for path, option in ((big, "--big"), (small, "--small")):
        load_supported(path, task, option)
    # absolute paths: the user's own files, read before anything is copied
    pipeline = PairSpec(directory=dicts, task="translation", source_lang=source_lang, target_lang=target_lang,
                        text=text).text_pipeline()
    return check_text(pipeline, task, samples, options)


def make(out: Path, big: Path, small: Path, dicts: Path, source_lang: str, target_lang: str, text: dict[str, dict],
         task: str, max_len_b: int) -> PairSpec:
    """Copy the files into ``out`` and write its pair.json (BiLD's default thresholds, not measured)."""
    files = {"big.pt": big, "small.pt": small, **{f"dict.{lang}.txt": dicts / f"dict.{lang}.txt"
                                                  for lang in (source_lang, target_lang)}}
    forms = {}
    for side, form in text.items():
        forms[side] = dict(form)
        for key in ("model", "bpe_codes"):
            if key in form:
                path = Path(form[key])
                name = path.name if files.get(path.name, path) == path else f"{side}.{path.name}"
                files[name], forms[side][key] = path, name
    out.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        shutil.copyfile(path, out / name)
    spec = PairSpec(directory=out, task=task, source_lang=source_lang, target_lang=target_lang, text=forms,
                    bild=dict(DEFAULTS), generation={**GENERATION_DEFAULTS, "max_len_b": max_len_b},
                    run={"mode": "bild", "engine": "torch", "precision": "fp32",
                         "why": "not measured: bild-jobs pair init ran without a dev set (--dev-source/--dev-ref)"})
    spec.save()
    return PairSpec.load(out)


def default_mode(points: list[dict], max_drop: float) -> tuple[str, dict | None]:
    """"bild" with the fastest BiLD point within ``max_drop`` of the big model's quality when
    that point is at least MIN_SPEEDUP times as fast as the big model, else "big" (with that
    point, if any, for --bild)."""
    big = next(p for p in points if p["kind"] == "big")
    eligible = [Point(p["name"], p["kind"], p["speedup"], p["quality"]) for p in points
                if p["kind"] == "bild" and p["quality"] >= big["quality"] - max_drop]
    if not eligible:
        return "big", None
    best = recommend(eligible, big["quality"], max_drop)
    return ("bild" if best.speedup >= MIN_SPEEDUP else "big"), next(p for p in points if p["name"] == best.name)


def tune(out: Path, dev_source: Path, dev_ref: Path, limit: int, fallbacks: list[float], rollbacks: list[float],
         max_drop: float, device: str, echo) -> PairSpec:
    """Agreement, the sweep (into out/sweep), and the measured choice written into pair.json."""
    lines = read_lines(dev_source, limit)
    (share, tokens), = pair_agreement(out, lines, device=device).values()
    echo(f"agreement: the small model agrees with {100 * share:.1f}% of {tokens} big-model tokens")
    variants = grid(fallbacks, rollbacks, [DEFAULTS["max_small_steps"]], None)
    result = sweep(out, dev_source, dev_ref, variants, Batching.parse(RUNNER_BATCHING), 1, limit, None, device, echo)
    result["recommendation"] = decide(result, max_drop)
    write(result, out / "sweep")
    mode, chosen = default_mode(result["points"], max_drop)
    points = {p["kind"]: p for p in result["points"] if p["kind"] in ("big", "small")}
    metric, big_q = result["metric"], points["big"]["quality"]
    figures = (f"bild-jobs pair init, {datetime.date.today()}: {result['lines']} lines of {dev_source.name}, "
               f"{result['batching']}, one run on this machine; big {metric} {big_q:.2f}, small alone "
               f"{points['small']['quality']:.2f}; small-model agreement {100 * share:.1f}% of {tokens} big-model tokens")
    if chosen is None:
        why = f"big-only: no BiLD setting kept {metric} within {max_drop:g} of the big model's; {figures}"
    else:
        bild = (f"BiLD {chosen['name']} {chosen['speedup']:.2f}x the big model's greedy speed at {metric} "
                f"{chosen['quality']:.2f}")
        why = (f"{bild} (budget -{max_drop:g})" if mode == "bild" else
               f"big-only: the fastest BiLD setting within {max_drop:g} {metric}, {bild}, was not "
               f"{MIN_SPEEDUP:g}x faster") \
            + f"; {figures}"
    spec = PairSpec.load(out)
    if chosen is not None:
        spec.bild = {k: chosen[k] for k in SETTINGS}
    spec.run = {"mode": mode, "engine": "torch", "precision": "fp32", "why": why}
    spec.save()
    return spec


def _samples(sample: Path | None, dev_source: Path | None, dev_ref: Path | None) -> dict[str, list[str]]:
    source = sample or dev_source
    if source is None:
        raise PairCheckError("give --dev-source/--dev-ref (or --sample FILE of source lines): the tokenization is "
                             "checked on real lines")
    samples = {"source": read_lines(source, SAMPLE_LINES)}
    if dev_ref is not None:
        samples["target"] = read_lines(dev_ref, SAMPLE_LINES)
    return samples


FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
DIRECTORY = click.Path(exists=True, file_okay=False, path_type=Path)


@click.group(name="pair", help="Pair directories of your own fairseq checkpoints.")
def pair() -> None:
    pass


@pair.command(name="init", help=__doc__, short_help="A pair directory from your own checkpoints, checked, then tuned.")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--big", required=True, type=FILE, help="the big model's checkpoint")
@click.option("--small", required=True, type=FILE, help="the small model's checkpoint")
@click.option("--dicts", required=True, type=DIRECTORY,
              help="the directory with dict.SRC.txt and dict.TGT.txt the models were trained on (fairseq-preprocess's)")
@click.option("--source-lang", required=True, help="fairseq's source suffix (dict.SRC.txt)")
@click.option("--target-lang", required=True, help="fairseq's target suffix (dict.TGT.txt)")
@click.option("--text", "text_value", required=True, help=f"tokenization of both sides: {TEXT_HELP}")
@click.option("--target-text", help="the target side's tokenization, when it differs from --text")
@click.option("--small-dicts", type=DIRECTORY, help="the small model's own dictionaries: checked equal to --dicts's")
@click.option("--task", type=click.Choice(["translation", "summarization"]), default="translation",
              show_default=True, help="scores BLEU or ROUGE-L")
@click.option("--max-len-b", type=click.IntRange(min=1), default=GENERATION_DEFAULTS["max_len_b"], show_default=True,
              help="max output length")
@click.option("--sample", type=FILE, help=f"source lines to check the tokenization on (first {SAMPLE_LINES}) "
              "[--dev-source]")
@click.option("--dev-source", type=FILE, help="dev source lines: measure agreement and sweep thresholds")
@click.option("--dev-ref", type=FILE, help="dev references, line-aligned with --dev-source")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True, help="dev lines used")
@click.option("--max-quality-drop", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="quality budget: BiLD may lose at most this much of the big model's score")
@click.option("--fallback", default="0.3,0.5,0.7,0.9", show_default=True, help="fallback thresholds swept")
@click.option("--rollback", default="1,2,3,5", show_default=True, help="rollback thresholds swept")
@click.option("--device", default="cpu", show_default=True)
def init(out: Path, big: Path, small: Path, dicts: Path, source_lang: str, target_lang: str, text_value: str,
         target_text: str | None, small_dicts: Path | None, task: str, max_len_b: int, sample: Path | None,
         dev_source: Path | None, dev_ref: Path | None, limit: int, max_quality_drop: float, fallback: str,
         rollback: str, device: str) -> None:
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise PairCheckError(f"{out} exists and is not empty: give a new directory")
        if (dev_source is None) != (dev_ref is None):
            raise PairCheckError("--dev-source and --dev-ref go together: the sweep scores against the references")
        source = parse_text(text_value, "--text")
        text = {"source": source, "target": parse_text(target_text, "--target-text") if target_text else source}
        options = {"source": "--text", "target": "--target-text" if target_text else "--text"}
        figures = check(big, small, dicts, small_dicts, source_lang, target_lang, text,
                        _samples(sample, dev_source, dev_ref), options)
        for side, f in figures.items():
            echo(f"checked: {side} tokenization on {f.lines} lines: {100 * f.round_trip:.0f}% round-trip, "
                 f"{100 * f.unknown:.1f}% of {f.units} units unknown")
        spec = make(out, big, small, dicts, source_lang, target_lang, text, task, max_len_b)
        click.echo(f"wrote {spec.directory / 'pair.json'}")
        if dev_source is not None:
            spec = tune(out, dev_source, dev_ref, limit, parse_floats(fallback), parse_floats(rollback), max_quality_drop,
                        device, echo)
            click.echo(f"tuned: default mode {spec.run['mode']} ({spec.run['why']}); thresholds {spec.bild}; "
                       f"sweep in {out / 'sweep'}")
    except (PairCheckError, PairDirError, MeasureError, BildOptionError) as e:
        raise click.ClickException(str(e)) from None
