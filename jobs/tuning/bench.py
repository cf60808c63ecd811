"""`bild-jobs bench`: is BiLD faster at (almost) the big model's quality? One run, one machine.

\b
    bild-jobs bench benchmarks/suites.json --repeats 3 --out benchmarks/out

For each suite (a pair directory and a test set), every variant decodes the same batches,
interleaved batch by batch (see jobs.tuning.measure), at every batching:

\b
    stock        fairseq's own SequenceGenerator(beam_size=1), big model: what a user runs today
    big          the project's greedy loop, big model only (separates BiLD's gain from overhead)
    small        the project's greedy loop, small model only
    bild-exact   BiLD exact mode (output must equal stock's)
    bild-default BiLD at pair.json's thresholds
    bild-tuned   BiLD at the suite's thresholds from a sweep (when given)
    ct2-fp32     peer: CTranslate2 greedy on the big model (its own converter), float32 weights
                 (ct2-fp16, ct2-bf16 under --precision fp16, bf16)
    ct2-int8     the same with int8 weights (both skipped, with a note, without ctranslate2)

--precision fp16 (GPU only) or bf16 puts both models of every variant in that precision; the
ONNX Runtime rows, fp32 on the CPU, are then skipped with a note.

plus the small/bild variants of any other small checkpoint the suite lists (`@name`).
Writes bench.json and bench.md to --out; --update-markdown rewrites BENCHMARKS.md's results.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from bild_fairseq.config import SETTINGS, THRESHOLDS, BildOptionError
from bild_fairseq.pairdir import PairDirError
from bild_fairseq.precision import PRECISIONS, check_precision
from bild_fairseq.scoring import score_task
from jobs.shards import read_lines
from jobs.tuning.agreement import agreement
from jobs.tuning.costs import loop_split, pass_costs
from jobs.tuning.ties import near_ties
from jobs.tuning.measure import (Batching, MeasureError, PairModels, Result, Variant, bild_rates,
                                 detokenize, encode, engine_tag, measure, plan_batches, small_suffix)
from jobs.tuning.peers import CT2_TYPES, PeerUnavailable, ct2_missing
from jobs.workdir import sha256_file

DEFAULT_BATCHINGS = ("1", "16", "tokens:4096")
#: the engines measured, named as --engine takes them
ENGINE_CHOICES = {"torch": ("torch", False), "onnxruntime": ("onnxruntime", False),
                  "onnxruntime-int8": ("onnxruntime", True)}
DEFAULT_ENGINES = tuple(ENGINE_CHOICES.values())


@dataclass(frozen=True)
class SmallModel:
    """A small checkpoint of the pair (None: pair.json's) and its swept thresholds, if any."""

    checkpoint: str | None = None
    tuned: dict | None = None

    @property
    def suffix(self) -> str:
        return small_suffix(self.checkpoint)

    def variants(self, per_sentence: bool = False, engine: str = "torch", int8: bool = False) -> list[Variant]:
        """``per_sentence``: also exact and default BiLD under the paper's per-sentence batch
        policy (the big model runs as soon as one sentence needs it), beside pair.json's. On
        another engine than torch: the BiLD variants only (the small-only row is torch's)."""
        ckpt, rt = self.checkpoint, {"engine": engine, "int8": int8}
        s = self.suffix + engine_tag(engine, int8)
        out = [Variant(f"bild-exact{s}", "bild", ckpt, exact=True, **rt), Variant(f"bild-default{s}", "bild", ckpt, **rt)]
        if engine == "torch":
            out.insert(0, Variant(f"small{s}", "small", ckpt))
        if per_sentence:
            eager = {"wait_share": 0.0, "verify_drafting": False}
            out += [Variant(f"bild-exact-eager{s}", "bild", ckpt, exact=True, **eager, **rt),
                    Variant(f"bild-default-eager{s}", "bild", ckpt, **eager, **rt)]
        if self.tuned:
            out.append(Variant(f"bild-tuned{s}", "bild", ckpt, **{t: self.tuned[t] for t in SETTINGS if t in self.tuned},
                               **rt))
        return out


@dataclass(frozen=True)
class Suite:
    name: str
    pair: Path
    source: Path
    reference: Path
    small: tuple[SmallModel, ...] = (SmallModel(),)
    limit: int | None = None  # first N test lines (a slow pair can be given fewer)
    per_sentence: bool = False  # also the per-sentence batch policy's rows (SmallModel.variants)

    def variants(self, peers: bool = True, engines: tuple[tuple[str, bool], ...] = (("torch", False),),
                 precision: str = "fp32") -> list[Variant]:
        """stock, then per engine (torch first) the big-only loop and the BiLD variants, then the
        peers (CTranslate2 in ``precision`` and in int8)."""
        own = [Variant("stock", "stock")]
        for engine, int8 in dict.fromkeys((("torch", False), *engines)):
            own += [Variant("big" + engine_tag(engine, int8), "big", engine=engine, int8=int8),
                    *(v for s in self.small for v in s.variants(self.per_sentence, engine, int8))]
        return own + ([Variant(f"ct2-{precision}", "ct2", compute_type=CT2_TYPES[precision]),
                       Variant("ct2-int8", "ct2", compute_type="int8")] if peers else [])


def load_suites(path: Path) -> list[Suite]:
    """Suites from a JSON file; relative paths are relative to the file. Format::

        {"suites": [{"name": "deen", "pair": "../data/pairs/deen",
                     "source": "...test.de.xz", "reference": "...test.en.xz", "limit": 300,
                     "per_sentence": false,   # true: also rows for the per-sentence batch policy
                     "small": [{"checkpoint": null, "tuned": {"fallback_threshold": 0.4,
                                "rollback_threshold": 3, "max_small_steps": 10, "source": "..."}}]}]}
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        suites = []
        for entry in raw["suites"]:
            small = tuple(SmallModel(s.get("checkpoint"), s.get("tuned")) for s in entry.get("small", [{}]))
            for s in small:
                missing = [t for t in THRESHOLDS if s.tuned and t not in s.tuned]
                if missing:
                    raise MeasureError(f"suite {entry['name']!r}: tuned thresholds lack {missing}")
            suites.append(Suite(entry["name"], *(Path(os.path.normpath(path.parent / entry[k]))
                                                 for k in ("pair", "source", "reference")), small, entry.get("limit"),
                                bool(entry.get("per_sentence", False))))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MeasureError(f"{path}: not a suites file ({type(e).__name__}: {e}); see `bild-jobs bench --help`") from None
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise MeasureError(f"{path}: suite names must be unique, got {names}")
    return suites


def _row(v: Variant, batching: Batching, r: Result, results: dict[str, Result], scores: dict) -> dict:
    """One table row: speed, ratios against stock and big at the same batching, quality, counters."""
    seconds = r.median_seconds
    row = {"batching": batching.name, "variant": v.name, "seconds": r.seconds, "median_seconds": seconds,
           "sentences_per_second": len(r.tokens) / seconds, "tokens": r.token_count,
           "tokens_per_second": r.token_count / seconds, "scores": scores}
    for base in ("stock", "big"):
        row[f"speedup_vs_{base}"] = results[base].median_seconds / seconds if base in results else None
    if "stock" in results:
        row["same_as_stock"] = sum(a.equal(b) for a, b in zip(r.tokens, results["stock"].tokens))
    if (big := "big" + v.engine_tag) in results:  # the same engine and precision's greedy output
        row["same_as_big"] = sum(a.equal(b) for a, b in zip(r.tokens, results[big].tokens))
    if v.mode == "bild":
        row.update(stats=r.stats, **bild_rates(r.stats))
    return row


def run_suite(suite: Suite, batchings: list[Batching], repeats: int, limit: int | None, device: str,
              threads: int | None, memory: bool, echo, engines: tuple[tuple[str, bool], ...] = DEFAULT_ENGINES,
              precision: str = "fp32") -> dict:
    """Measure every variant of ``suite`` at every batching, both models in ``precision``; the
    suite's JSON result."""
    limit = limit or suite.limit
    lines, refs = read_lines(suite.source, limit), read_lines(suite.reference, limit)
    if len(lines) != len(refs):
        raise MeasureError(f"{suite.source} has {len(lines)} lines but {suite.reference} has {len(refs)}")
    notes = [f"CTranslate2 rows skipped: {why}"] if (why := ct2_missing()) else []
    if any(e == "onnxruntime" for e, _ in engines) and (why_not := ort_missing(device, precision)):
        notes.append(f"ONNX Runtime rows skipped: {why_not}")
        engines = tuple((e, i) for e, i in engines if e != "onnxruntime")
    variants = suite.variants(peers=why is None, engines=engines, precision=precision)
    models = PairModels(suite.pair, variants, device, precision)
    translators = {}
    for v in variants:
        try:
            translators[v.name] = models.translator(v)
        except PeerUnavailable as e:
            notes.append(f"{v.name} skipped: {e}")
    variants = [v for v in variants if v.name in translators]
    if any(v.mode == "ct2" for v in variants):
        notes.append(f"CTranslate2 conversion of {models.spec.big}: {models.conversion_seconds:.1f} s "
                     "(0 = cached), not timed")
    notes += export_notes(translators.values())
    sources = encode(models.base, lines)
    echo(f"[{suite.name}] {len(lines)} lines, {len(variants)} variants, {repeats} repeat(s)")
    rows, signatures, first = [], {}, None
    for batching in batchings:
        started = time.monotonic()
        results = measure(translators, sources, batching, repeats,
                          lambda msg: echo(f"[{suite.name}] {msg} ({time.monotonic() - started:.0f} s)"))
        first = first or results
        for v in variants:
            scores = score_task(models.spec.task, detokenize(models.base, results[v.name].tokens), refs)
            signatures.update({s.name: s.signature for s in scores})
            rows.append(_row(v, batching, results[v.name], results, {s.name: s.value for s in scores}))
    eos = models.base.task.target_dictionary.eos()
    differences = {name: {"reference": ref, **near_ties(models.big, sources, first[name].tokens, first[ref].tokens,
                                                        eos, precision)}
                   for name, ref in compared(variants) if ref in first}
    loop = {}
    if any(b.max_sentences == 1 for b in batchings):  # bookkeeping per loop iteration at batch 1, untimed pass
        echo(f"[{suite.name}] loop accounting at batch 1")
        batches = [[sources[i] for i in b] for b in plan_batches(sources, Batching(1, 1_000_000))]
        loop = {v.name: loop_split(translators[v.name], batches) for v in variants if v.mode in ("big", "bild")}
    echo(f"[{suite.name}] model call costs per engine")
    longest = max(sources, key=lambda s: s.numel())
    costs = pass_costs(models, longest, tuple(dict.fromkeys((("torch", False), *engines))))
    tgt = models.base.task.target_dictionary
    agreements = {s.checkpoint or models.spec.small: agreement(models.small[s.checkpoint], sources,
                                                                 first["big"].tokens, tgt.pad(), tgt.eos())
                  for s in suite.small}
    if memory:
        _add_peak_memory(suite, variants, lines, batchings, device, threads, rows, echo, precision)
    files = [models.spec.big, *(s.checkpoint or models.spec.small for s in suite.small)]
    return {"name": suite.name, "pair": str(suite.pair), "task": models.spec.task, "source": str(suite.source),
            "model_sha256": {f: sha256_file(models.spec.model_path(f))[:16] for f in files},
            "reference": str(suite.reference), "lines": len(lines), "pair_bild": models.spec.bild,
            "variants": [{**asdict(v), "run_flags": v.run_flags(models.spec.bild),
                          "generate_flags": v.generate_flags(models.spec.bild)} for v in variants],
            "signatures": signatures, "agreement": agreements, "notes": notes, "rows": rows,
            "loop_batch1": loop, "call_costs_ms": costs, "call_costs_source_tokens": longest.numel(),
            "differences": differences}


def compared(variants: list[Variant]) -> list[tuple[str, str]]:
    """(variant, reference) pairs whose outputs must agree but for near ties (ties.MARGIN): each
    fp32-weight big-only loop against stock fairseq, each exact mode against its engine's big-only
    loop. On the CPU in fp32 the torch rows are identical (the tests assert it); on a GPU or in
    fp16/bf16 kernels and rounding may flip near ties, which the report counts."""
    return [(v.name, "stock") for v in variants if v.mode == "big" and not v.int8] + \
        [(v.name, "big" + v.engine_tag) for v in variants if v.mode == "bild" and v.exact]


def ort_missing(device: str, precision: str = "fp32") -> str | None:
    """Why the ONNX Runtime rows cannot run here (None: they can)."""
    from bild_fairseq.engines import onnxruntime_available

    if device != "cpu" or precision != "fp32":
        return f"the onnxruntime engine runs fp32 models on the CPU, not {precision} on {device}"
    return None if onnxruntime_available() else "onnxruntime is not installed"


def export_notes(translators) -> list[str]:
    """What exporting each model's ONNX graphs took (never inside a timed region)."""
    seconds = {}
    for t in translators:
        for role in ("big", "small"):
            engine = getattr(t.generator, role, None)
            if getattr(engine, "export_seconds", None) is not None:
                seconds[(role, engine.precision)] = engine.export_seconds
    return [f"ONNX export of the {role} model ({precision}): {s:.1f} s, before timing (cached after)"
            for (role, precision), s in seconds.items()]


def _add_peak_memory(suite: Suite, variants: list[Variant], lines: list[str], batchings: list[Batching],
                     device: str, threads: int | None, rows: list[dict], echo, precision: str) -> None:
    """Peak RSS (and on a GPU the CUDA peak) per variant and batching, each variant in a fresh
    process, after all timing; see :func:`memory_workers` for how many at once."""
    from jobs.tuning.peakmem import peak_memory

    echo(f"[{suite.name}] peak memory of {len(variants)} variants, each in a fresh process")
    plan = [(b.max_sentences, b.max_tokens) for b in batchings]
    with tempfile.TemporaryDirectory(prefix="bild-bench-") as scratch, \
            ThreadPoolExecutor(max_workers=memory_workers(device, len(variants))) as pool:
        peaks = dict(zip((v.name for v in variants), pool.map(
            lambda v: peak_memory(suite.pair, asdict(v), lines, plan, device, threads, Path(scratch) / v.name,
                                  precision),
            variants)))
    for row in rows:
        row["memory"] = peaks[row["variant"]][row["batching"]]


def memory_workers(device: str, variants: int) -> int:
    """Processes of the memory pass at once: one per core on the CPU (a process's resident set
    does not depend on its neighbours'), one at a time on a GPU, where side by side they would
    hold several CUDA contexts on one card and each RSS would include its context."""
    return 1 if device.startswith("cuda") else max(1, min(variants, os.cpu_count() or 1))


def machine() -> dict:
    """What the numbers were measured on."""
    import fairseq
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    info = {"cpu": models[0] if models else platform.processor(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "fairseq": fairseq.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_start": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_benchmark(suites: list[Suite], batchings: list[Batching], repeats: int, limit: int | None, device: str,
                  threads: int | None, memory: bool, command: str, echo,
                  engines: tuple[tuple[str, bool], ...] = DEFAULT_ENGINES, precision: str = "fp32") -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    info = machine()
    results = [run_suite(s, batchings, repeats, limit, device, threads, memory, echo, engines, precision)
               for s in suites]
    info["load_average_end"] = list(os.getloadavg())
    return {"format": 1, "command": command, "wall_seconds": time.time() - started,
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "device": device,
            "precision": precision,
            "repeats": repeats, "limit": limit, "batchings": [b.name for b in batchings], "machine": info,
            "suites": results}


def command_line(ctx: click.Context) -> str:
    """The command with every option spelled out (defaults included): rerunning it repeats the run."""
    words = ["bild-jobs", ctx.command.name]
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif param.is_flag and param.secondary_opts:
            words.append(param.opts[0] if value else param.secondary_opts[0])
        elif value is not None:
            words += [x for v in (value if param.multiple else [value]) for x in (param.opts[0], str(v))]
    return shlex.join(words)


@click.command(name="bench", help=__doc__)
@click.argument("suites_file", metavar="SUITES.json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/out"),
              show_default=True, help="writes bench.json and bench.md here")
@click.option("--suite", "only", multiple=True, help="run only this suite (repeatable) [all]")
@click.option("--batch", "batch_texts", multiple=True, default=DEFAULT_BATCHINGS, show_default=True,
              help="batching: sentences per batch (1, 16) or tokens:N (max padded source tokens); repeatable")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="timed passes over the test set per variant and batching (the median is reported)")
@click.option("--limit", type=click.IntRange(min=1), help="use the first N lines of each test set [the suite's "
              "\"limit\", else all]")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="peak RSS per variant, each in a fresh process, after the timing (one more pass each)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--threads", type=click.IntRange(min=1), help="torch threads [torch's default, OMP_NUM_THREADS]")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="both models of every variant (fp16: GPU only)")
@click.option("--engine", "engine_names", multiple=True, type=click.Choice(list(ENGINE_CHOICES)),
              default=tuple(ENGINE_CHOICES), show_default=True,
              help="engines of the big-only and BiLD rows (torch always; repeatable)")
@click.option("--update-markdown", type=click.Path(dir_okay=False, path_type=Path),
              help="also rewrite the generated section of this file (e.g. BENCHMARKS.md)")
def bench(suites_file: Path, out: Path, only: tuple[str, ...], batch_texts: tuple[str, ...], repeats: int,
          limit: int | None, memory: bool, device: str, threads: int | None, precision: str,
          engine_names: tuple[str, ...], update_markdown: Path | None) -> None:
    from jobs.tuning.benchreport import render, update_section
    from jobs.tuning.targets import load_targets

    try:
        check_precision(precision, device)
        suites = load_suites(suites_file)
        unknown = set(only) - {s.name for s in suites}
        if unknown:
            raise MeasureError(f"no suite named {sorted(unknown)} in {suites_file} (it has {[s.name for s in suites]})")
        suites = [s for s in suites if not only or s.name in only]
        batchings = [Batching.parse(b) for b in batch_texts]
        command = command_line(click.get_current_context())
        targets = load_targets(suites_file)  # read first: a broken file stops the run before it starts
        result = run_benchmark(suites, batchings, repeats, limit, device, threads, memory, command,
                               lambda m: click.echo(m, err=True), tuple(ENGINE_CHOICES[n] for n in engine_names),
                               precision)
        result["targets"] = targets  # the report checks them; kept with the result it was checked on
    except (MeasureError, PairDirError, BildOptionError) as e:
        raise click.ClickException(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    markdown = render(result)
    (out / "bench.md").write_text(markdown, encoding="utf-8")
    if update_markdown:
        update_section(update_markdown, markdown)
    click.echo(markdown)
    click.echo(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", err=True)


if __name__ == "__main__":
    bench()
