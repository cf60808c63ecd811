"""`bild-jobs sweep`: pick BiLD's thresholds on a dev set, from measured speed and quality.

\b
    bild-jobs sweep --pair data/pairs/deen --input data/corpora/lohelp.de-en.valid.de.xz \\
        --ref data/corpora/lohelp.de-en.valid.en.xz --limit 200 --max-quality-drop 0.5 --out sweep-deen

Decodes the dev lines with the big model alone, the small model alone, BiLD exact mode and BiLD
at every (fallback, rollback, max-small-steps) grid point, interleaved on identical batches (see
jobs.tuning.measure), then writes points.csv/points.json, sweep.png (quality vs speedup, Pareto frontier)
and recommendation.json, and prints the flags of the fastest setting within the quality budget.
"""
from __future__ import annotations

import csv
import itertools
import json
import shlex
from pathlib import Path

import click

from bild_fairseq.config import DEFAULTS, SETTINGS, BildOptionError
from bild_fairseq.pairdir import PairDirError
from bild_fairseq.precision import FAIRSEQ_FLAGS, PRECISIONS, check_precision
from bild_fairseq.scoring import PRIMARY_METRIC, score_task
from jobs.plugin import plugin_dir
from jobs.shards import read_lines
from jobs.tuning.measure import (Batching, MeasureError, PairModels, Variant, bild_rates, detokenize,
                                 encode, measure)
from jobs.tuning.pareto import Point, frontier, plot, recommend

def grid(fallbacks: list[float], rollbacks: list[float], steps: list[int], small: str | None,
         shares: list[float] = (0.0,), max_waits: list[int] = (DEFAULTS["max_wait"],),
         verify: list[bool] = (False,), engine: str = "torch", int8: bool = False) -> list[Variant]:
    """The baselines, exact mode (at each batch policy), and BiLD at every combination, all on
    ``engine`` (the small-only baseline on torch: it only shows the small model's quality)."""
    rt = {"engine": engine, "int8": int8}
    points = [Variant("big", "big", **rt), Variant("small", "small", small)]
    policies = list(itertools.product(shares, max_waits, verify))
    for w, m, d in policies:
        points.append(Variant("exact" + _policy_name(w, m, d), "bild", small, exact=True, wait_share=w, max_wait=m,
                              verify_drafting=d, **rt))
    for f, r, s in itertools.product(fallbacks, rollbacks, steps):
        for w, m, d in policies:
            points.append(Variant(f"fb{f:g}-rb{r:g}-s{s}" + _policy_name(w, m, d), "bild", small,
                                  fallback_threshold=f, rollback_threshold=r, max_small_steps=s,
                                  wait_share=w, max_wait=m, verify_drafting=d, **rt))
    return points


def _policy_name(share: float, max_wait: int, verify: bool) -> str:
    """"" for the per-sentence policy (the paper's), else e.g. -w0.5-mw8-vd."""
    if share == 0 and not verify:
        return ""
    return f"-w{share:g}" + (f"-mw{max_wait}" if max_wait != DEFAULTS["max_wait"] else "") + ("-vd" if verify else "")


def _kind(v: Variant) -> str:
    return "exact" if v.exact else v.mode


def sweep(pair: Path, source: Path, ref: Path, variants: list[Variant], batching: Batching, repeats: int,
          limit: int | None, metric: str | None, device: str, echo, precision: str = "fp32") -> dict:
    """Measure every variant; the points with their speed, quality and BiLD counters."""
    lines, refs = read_lines(source, limit), read_lines(ref, limit)
    if len(lines) != len(refs):
        raise MeasureError(f"{source} has {len(lines)} lines but {ref} has {len(refs)}")
    models = PairModels(pair, variants, device, precision)
    metric = metric or PRIMARY_METRIC[models.spec.task]
    translators = {v.name: models.translator(v) for v in variants}
    echo(f"sweep: {len(variants)} points on {len(lines)} lines, {batching.name}, {repeats} repeat(s)")
    results = measure(translators, encode(models.base, lines), batching, repeats, echo)
    big_seconds = results["big"].median_seconds
    rows = []
    for v in variants:
        r = results[v.name]
        scores = {s.name: s.value for s in score_task(models.spec.task, detokenize(models.base, r.tokens), refs)}
        if metric not in scores:
            raise MeasureError(f"--metric {metric}: the {models.spec.task} metrics are {sorted(scores)}")
        settings = v.settings(models.spec.bild) if _kind(v) == "bild" else dict.fromkeys(SETTINGS)
        rows.append({"name": v.name, "kind": _kind(v), **settings,
                     "seconds": r.median_seconds, "speedup": big_seconds / r.median_seconds,
                     "quality": scores[metric], **scores,
                     **bild_rates(r.stats if v.mode == "bild" else {}),
                     "run_flags": " ".join(v.run_flags(models.spec.bild)),
                     "generate_flags": " ".join(v.generate_flags(models.spec.bild))})
    small = next(v.small_checkpoint for v in variants if v.mode == "small") or models.spec.small
    return {"pair": str(pair), "task": models.spec.task, "source": str(source), "reference": str(ref),
            "lines": len(lines), "batching": batching.name, "repeats": repeats, "metric": metric,
            "device": device, "precision": precision,
            "models": {"big": str(models.spec.model_path("big")), "small": str(models.spec.model_path(small))},
            "points": rows}


def decide(result: dict, max_drop: float) -> dict:
    """Mark the frontier and the recommendation on ``result``'s points; the recommendation."""
    points = {p["name"]: Point(p["name"], p["kind"], p["speedup"], p["quality"]) for p in result["points"]}
    front = {p.name for p in frontier(list(points.values()))}
    big_quality = points["big"].quality
    best = recommend(list(points.values()), big_quality, max_drop)
    for p in result["points"]:
        p["pareto"], p["recommended"] = p["name"] in front, p["name"] == best.name
    chosen = next(p for p in result["points"] if p["name"] == best.name)
    big, small = result["models"]["big"], result["models"]["small"]
    models = {"big": ["--path", big], "small": ["--path", small]}.get(
        chosen["kind"], ["--user-dir", plugin_dir(), "--path", big, "--bild-small-path", small])
    precision = result["precision"]  # the precision the points were measured in
    run_precision = "" if precision == "fp32" else f" --precision {precision}"
    return {"point": chosen["name"], "kind": chosen["kind"], "speedup": chosen["speedup"],
            "quality": chosen["quality"], "big_quality": big_quality, "metric": result["metric"],
            "max_quality_drop": max_drop,
            "run_command": f"bild-jobs run INPUT --pair {result['pair']} -o OUTPUT {chosen['run_flags']}{run_precision}",
            "generate_command": shlex.join(["fairseq-generate", "DATA", *models, *chosen["generate_flags"].split(),
                                            *FAIRSEQ_FLAGS[precision]]),
            # paste into a benchmark suite's "tuned" (bild-jobs bench)
            "tuned": {t: chosen[t] for t in SETTINGS} if chosen["kind"] == "bild" else None}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = [k for k in result["points"][0] if k not in ("run_flags", "generate_flags")] + ["run_flags"]
    with open(out / "points.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["points"])
    (out / "points.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    rec = result["recommendation"]
    (out / "recommendation.json").write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    points = [Point(p["name"], p["kind"], p["speedup"], p["quality"]) for p in result["points"]]
    chosen = next(p for p in points if p.name == rec["point"])
    plot(points, chosen, rec["big_quality"], rec["max_quality_drop"], result["metric"],
         f"{Path(result['pair']).name}: {result['lines']} lines of {Path(result['source']).name}, {result['batching']}",
         out / "sweep.png")


def parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _bad(message: str):
    raise click.BadParameter(message)


@click.command(name="sweep", help=__doc__)
@click.option("--pair", "pair_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--input", "source", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="dev source lines (plain, .gz or .xz); never the test set")
@click.option("--ref", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="dev references, line-aligned with --input")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--fallback", default="0.3,0.5,0.7,0.9", show_default=True, help="fallback thresholds (comma-separated)")
@click.option("--rollback", default="1,2,3,5", show_default=True, help="rollback thresholds (comma-separated)")
@click.option("--max-small-steps", "steps", default="10", show_default=True, help="max small steps (comma-separated)")
@click.option("--wait-share", "shares", default="0", show_default=True,
              help="batch policy: shares of the batch that must wait before the big model runs (comma-separated)")
@click.option("--max-wait", "max_waits", default=str(DEFAULTS["max_wait"]), show_default=True,
              help="batch policy: most iterations a sentence waits (comma-separated)")
@click.option("--verify-drafting", "verify", default="no", show_default=True,
              help="batch policy: check drafting sentences along each big pass: no, yes or no,yes")
@click.option("--max-quality-drop", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="quality budget: the recommendation loses at most this much of the big model's score")
@click.option("--metric", help="BLEU, chrF, ROUGE-1, ROUGE-2 or ROUGE-L [BLEU for translation, ROUGE-L for summarization]")
@click.option("--small-checkpoint", help="small model file in the pair directory [pair.json's]")
@click.option("--batch", "batch_text", default="1", show_default=True, help="sentences per batch, or tokens:N")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="use the first N dev lines [all]")
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="both models (fp16: GPU only; the onnxruntime engine: fp32)")
@click.option("--engine", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="runtime of the big-only and BiLD points (bild-jobs run's --engine)")
@click.option("--int8", is_flag=True, help="onnxruntime: 8-bit weights (bild-jobs run's --int8)")
def sweep_command(pair_dir: Path, source: Path, ref: Path, out: Path, fallback: str, rollback: str, steps: str,
                  shares: str, max_waits: str, verify: str, max_quality_drop: float, metric: str | None, small_checkpoint: str | None, batch_text: str,
                  repeats: int, limit: int | None, device: str, precision: str, engine: str, int8: bool) -> None:
    try:
        check_precision(precision, device)
        step_values = [int(s) for s in parse_floats(steps)]
        verify_values = [{"no": False, "yes": True}[v.strip()] if v.strip() in ("no", "yes") else
                         _bad(f"--verify-drafting: expected no, yes or no,yes, got {verify!r}") for v in verify.split(",")]
        variants = grid(parse_floats(fallback), parse_floats(rollback), step_values, small_checkpoint, parse_floats(shares),
                        [int(m) for m in parse_floats(max_waits)], verify_values, engine, int8)
        result = sweep(pair_dir, source, ref, variants, Batching.parse(batch_text), repeats, limit, metric, device,
                       lambda m: click.echo(m, err=True), precision)
    except (MeasureError, PairDirError, BildOptionError) as e:
        raise click.ClickException(str(e)) from None
    result["recommendation"] = rec = decide(result, max_quality_drop)
    write(result, out)
    click.echo(f"wrote {out / 'points.csv'}, {out / 'sweep.png'}, {out / 'recommendation.json'}")
    click.echo(f"recommended: {rec['point']}: {rec['speedup']:.2f}x the big model's greedy speed, "
               f"{rec['metric']} {rec['quality']:.2f} (big {rec['big_quality']:.2f}, budget -{max_quality_drop:g})")
    click.echo(f"  {rec['run_command']}")
    click.echo(f"  {rec['generate_command']}")


if __name__ == "__main__":
    sweep_command()
