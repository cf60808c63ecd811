"""Timed decoding of several decoding variants on identical batches: what the benchmark, the
threshold sweep and the distillation report are all made of.

Every variant of a pair shares one copy of each model, so a 30-point sweep loads two models,
not sixty, and all variants decode with the very same weights. Only the generator's own work is
timed (``generator.generate`` on a collated batch, as fairseq-generate's own timer does): Moses
tokenization, BPE and detokenization are the same for every variant and are done once, untimed.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import Callable, Iterable, Sequence

import torch

from bild_fairseq.api import PairTranslator, build_generator, length_batches
from bild_fairseq.config import BATCH_POLICY, DEFAULTS, SETTINGS, BildChoice
from bild_fairseq.pairdir import PairSpec
from bild_fairseq.stats import BildStats

MODES = ("stock", "big", "small", "bild", "ct2")


class MeasureError(ValueError):
    """A variant, batching or input the measurement cannot run (the message says which)."""


def engine_tag(engine: str, int8: bool) -> str:
    """How variant names show the engine: "" for torch, "/ort" (fp32) or "/ort8" (8-bit weights)."""
    return "" if engine == "torch" else "/ort8" if int8 else "/ort"


@dataclass(frozen=True)
class Variant(BildChoice):
    """One way to decode with a pair: ``stock`` is fairseq's own SequenceGenerator(beam_size=1)
    with the big model, ``big``/``small`` the project's greedy loop with one model, ``bild`` BiLD,
    ``ct2`` CTranslate2's greedy search on the big model (a peer, ``compute_type`` float32/int8).
    Thresholds left None are the pair's (pair.json)."""

    name: str
    mode: str
    small_checkpoint: str | None = None
    compute_type: str | None = None
    engine: str = "torch"  # the greedy loop's runtime (bild_fairseq.engines): torch or onnxruntime
    int8: bool = False  # onnxruntime: 8-bit weights

    @property
    def engine_tag(self) -> str:
        return engine_tag(self.engine, self.int8)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MeasureError(f"variant {self.name!r}: mode must be one of {MODES}, got {self.mode!r}")
        if (self.mode == "ct2") != (self.compute_type is not None):
            raise MeasureError(f"variant {self.name!r}: compute_type is for (and required by) mode 'ct2'")
        if self.mode != "bild" and self.bild_given():
            raise MeasureError(f"variant {self.name!r}: thresholds, batch policy and exact apply to mode 'bild' only")
        if self.mode in ("stock", "big", "ct2") and self.small_checkpoint is not None:
            raise MeasureError(f"variant {self.name!r}: mode {self.mode!r} uses no small model")
        if self.mode in ("stock", "ct2") and (self.engine != "torch" or self.int8):
            raise MeasureError(f"variant {self.name!r}: mode {self.mode!r} has its own engine")
        if self.int8 and self.engine != "onnxruntime":
            raise MeasureError(f"variant {self.name!r}: int8 is a precision of the onnxruntime engine")

    @property
    def uses_big(self) -> bool:
        return self.mode != "small"

    @property
    def uses_small(self) -> bool:
        return self.mode in ("small", "bild")

    def run_flags(self, pair_bild: dict) -> list[str]:
        """The ``bild-jobs run`` options that decode like this variant (thresholds spelled out)."""
        if self.mode == "ct2":
            return [f"(peer: CTranslate2 {self.compute_type}, not a bild-jobs mode)"]
        engine = [] if self.engine == "torch" else ["--engine", self.engine, *(["--int8"] if self.int8 else [])]
        if self.mode in ("stock", "big"):
            return ["--big-only", *engine]
        small = ["--small-checkpoint", self.small_checkpoint] if self.small_checkpoint else []
        if self.mode == "small":
            return ["--small-only", *small, *engine]
        values = self.settings(pair_bild)
        names = BATCH_POLICY if self.exact else SETTINGS
        return [*small, *(["--bild-exact"] if self.exact else []), *_flags(values, names, "--", "--no-"), *engine]

    def generate_flags(self, pair_bild: dict) -> list[str]:
        """The stock ``fairseq-generate --user-dir $(bild-jobs plugin-dir)`` options of this variant."""
        if self.mode == "ct2":
            return []
        engine = [] if self.engine == "torch" else ["--bild-engine", self.engine, *(["--bild-int8"] if self.int8 else [])]
        if self.mode != "bild":
            return ["--beam", "1", *engine]
        values = self.settings(pair_bild)
        names = BATCH_POLICY if self.exact else SETTINGS
        return ["--bild", *(["--bild-exact"] if self.exact else []), *_flags(values, names, "--bild-", None),
                "--beam", "1", *engine]

    def settings(self, pair_bild: dict) -> dict:
        """The BiLD settings in effect: the variant's, else the pair's, else the defaults."""
        return {t: getattr(self, t) if getattr(self, t) is not None else pair_bild.get(t, DEFAULTS[t])
                for t in SETTINGS}


def _flags(values: dict, names: tuple[str, ...], prefix: str, negative: str | None) -> list[str]:
    """Command-line options for settings ``names``: a true flag is ``prefix`` + name, a false one
    ``negative`` + name (None: omitted, fairseq's store_true flags)."""
    out = []
    for name in names:
        option, value = name.replace("_", "-"), values[name]
        if isinstance(value, bool):
            out += [f"{prefix}{option}"] if value else ([f"{negative}{option}"] if negative else [])
        else:
            out += [f"{prefix}{option}", _fmt(value)]
    return out


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Batching:
    """How lines are batched, exactly as :meth:`PairTranslator.translate` batches them."""

    max_sentences: int | None
    max_tokens: int

    def __post_init__(self) -> None:
        if (self.max_sentences is not None and self.max_sentences < 1) or self.max_tokens < 1:
            raise MeasureError(f"batch sizes must be >= 1, got {self.max_sentences} sentences, {self.max_tokens} tokens")

    @property
    def name(self) -> str:
        return f"batch {self.max_sentences}" if self.max_sentences else f"max-tokens {self.max_tokens}"

    @classmethod
    def parse(cls, text: str, max_tokens: int = 1_000_000) -> "Batching":
        """``"16"``: 16 sentences per batch; ``"tokens:4096"``: up to 4096 padded source tokens."""
        tokens = text.startswith("tokens:")
        try:
            number = int(text[len("tokens:"):] if tokens else text)
        except ValueError:
            raise MeasureError(f"batching {text!r}: expected a batch size such as 16, or tokens:4096") from None
        return cls(None, number) if tokens else cls(number, max_tokens)


def small_suffix(checkpoint: str | None) -> str:
    """How variants and call costs name a small model: "" for pair.json's, "@STEM" for another."""
    return "" if checkpoint is None else "@" + Path(checkpoint).stem


class PairModels:
    """A pair directory's models, loaded once, and a translator per variant that shares them."""

    def __init__(self, pair_dir: str | Path, variants: Sequence[Variant], device: str = "cpu", precision: str = "fp32"):
        smalls = list(dict.fromkeys(v.small_checkpoint for v in variants if v.uses_small))
        first = "big" if any(v.uses_big for v in variants) else "small"
        self.base = PairTranslator.from_pair_dir(pair_dir, mode=first, device=device, precision=precision,
                                                 small_checkpoint=smalls[0] if first == "small" else None)
        self.big = self.base.generator.model.single_model if first == "big" else None
        self.small: dict[str | None, torch.nn.Module] = {}
        self.ct2_dir: Path | None = None  # the big model converted for CTranslate2 variants
        self.conversion_seconds = 0.0  # what converting it took (0 when cached or none)
        for name in smalls:
            loaded = self.base if first == "small" and name == smalls[0] else \
                PairTranslator.from_pair_dir(pair_dir, mode="small", small_checkpoint=name, device=device,
                                             precision=precision)
            self.small[name] = loaded.generator.model.single_model
            self.base = replace(self.base, max_source_tokens=min(self.base.max_source_tokens, loaded.max_source_tokens))

    @property
    def spec(self) -> PairSpec:
        return self.base.spec

    def translator(self, v: Variant) -> PairTranslator:
        """A translator decoding like ``v``, built on the shared models as the API builds its own
        (``stock``: fairseq's SequenceGenerator, as fairseq-generate without the plugin)."""
        from fairseq.sequence_generator import SequenceGenerator

        tgt = self.base.task.target_dictionary
        gen = {k: self.base.settings[k] for k in ("max_len_a", "max_len_b", "no_repeat_ngram_size")
               if k in self.base.settings}
        if v.mode == "ct2":
            from jobs.tuning.peers import CT2Generator, convert_ct2

            if self.ct2_dir is None:  # once per pair, for every CTranslate2 variant
                self.ct2_dir, self.conversion_seconds = convert_ct2(self.spec)
            generator = CT2Generator(self.ct2_dir, self.base.task.source_dictionary, tgt, v.compute_type,
                                     gen["max_len_b"], self.base.device)
        elif v.mode == "stock":
            generator = SequenceGenerator([self.big], tgt, beam_size=1, **gen)
        else:
            generator = build_generator(self.base.task, v.mode, self.big, self.small.get(v.small_checkpoint),
                                        bild=v.settings(self.spec.bild), gen=gen, exact=v.exact, engine=v.engine,
                                        int8=v.int8)
        settings = {**self.base.settings, "variant": asdict(v)}
        return replace(self.base, generator=generator, settings=settings)


def encode(translator: PairTranslator, lines: Sequence[str]) -> list[torch.Tensor]:
    """Source token ids of every line, as ``translate`` makes them (models' length limit included)."""
    pipeline = translator.spec.text_pipeline()
    for i, line in enumerate(lines):
        if not line.strip():
            raise MeasureError(f"input line {i + 1} is empty: benchmark on lines that all have text")
    return [translator.encode(line, pipeline)[0] for line in lines]


def plan_batches(sources: Sequence[torch.Tensor], batching: Batching) -> list[list[int]]:
    """Line indices of each batch: the API's own length-sorted batching."""
    items = list(enumerate(sources))
    return [[i for i, _ in batch] for batch in length_batches(items, batching.max_tokens, batching.max_sentences)]


def generate(translator: PairTranslator, sources: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """Decode one batch: seconds spent in the generator, and each line's output token ids."""
    # the translator's own device (cuda:1 too), not the current one
    synchronize = (lambda: torch.cuda.synchronize(translator.device)) if translator.device.startswith("cuda") \
        else (lambda: None)
    synchronize()
    t0 = time.perf_counter()
    hypos = translator.generate_batch(list(sources))  # the exact call translate() makes per batch
    synchronize()
    return time.perf_counter() - t0, [h["tokens"].cpu() for h in hypos]


def stats_of(translator: PairTranslator) -> BildStats | None:
    stats = getattr(translator.generator, "stats", None)
    return BildStats(**vars(stats)) if stats is not None else None


def bild_rates(stats: dict) -> dict:
    """BiLD's counters as rates: the share of small-model steps that handed over (fallback), of
    the big model's per-sentence verifications (``big_calls``; a pass may verify several sentences)
    that rejected a small-model token (rollback), of output tokens from the big model."""
    def share(a: str, b: str) -> float | None:
        return stats[a] / stats[b] if stats.get(b) else None

    return {"fallback_rate": share("fallbacks", "small_steps"), "rollback_rate": share("rollbacks", "big_calls"),
            "big_token_share": share("big_tokens", "tokens")}


@dataclass
class Result:
    """One variant at one batching: seconds per repeat, and the first repeat's outputs."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[torch.Tensor | None] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # BiLD counters of one pass ({} for stock)

    @property
    def median_seconds(self) -> float:
        return median(self.seconds)

    @property
    def token_count(self) -> int:
        return sum(t.numel() for t in self.tokens)


def measure(translators: dict[str, PairTranslator], sources: Sequence[torch.Tensor], batching: Batching,
            repeats: int, progress: Callable[[str], None] = lambda _: None) -> dict[str, Result]:
    """Decode every batch with every variant, ``repeats`` times, interleaved batch by batch in a
    rotating order, so that load changes on the machine hit all variants alike. One untimed
    batch per variant first, so lazy initialisation is not billed to whoever runs first."""
    if repeats < 1:
        raise MeasureError(f"repeats must be >= 1, got {repeats}")
    if not sources:
        raise MeasureError("no input lines to decode")
    names = list(translators)
    batches = plan_batches(sources, batching)
    for name in names:
        generate(translators[name], [sources[i] for i in batches[0]])
    before = {n: stats_of(t) for n, t in translators.items()}
    results = {n: Result(tokens=[None] * len(sources)) for n in names}
    for r in range(repeats):
        elapsed = dict.fromkeys(names, 0.0)
        for b, batch in enumerate(batches):
            shift = (r + b) % len(names)
            for name in names[shift:] + names[:shift]:
                seconds, tokens = generate(translators[name], [sources[i] for i in batch])
                elapsed[name] += seconds
                if r == 0:
                    for i, t in zip(batch, tokens):
                        results[name].tokens[i] = t
        for name in names:
            results[name].seconds.append(elapsed[name])
            after = stats_of(translators[name])
            if r == 0 and after is not None:  # the counters of exactly one pass
                results[name].stats = BildStats(**{k: v - getattr(before[name], k)
                                                   for k, v in vars(after).items()}).to_dict()
        progress(f"{batching.name}: repeat {r + 1}/{repeats} done")
    return results


def detokenize(translator: PairTranslator, tokens: Iterable[torch.Tensor]) -> list[str]:
    """Output token ids -> raw text, as ``translate`` returns it."""
    pipeline = translator.spec.text_pipeline()
    tgt = translator.task.target_dictionary
    return [pipeline.decode(tgt.string(t.int())) for t in tokens]
