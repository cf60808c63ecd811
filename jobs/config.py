"""A run's configuration, and its hash over exactly the settings that decide the output.

Resume compares hashes: the input's content, the shard plan, the pair's files and the decoding
options. Paths, executors, worker counts and batch sizes are not hashed: moving a corpus, adding
GPUs or lowering ``--max-tokens`` after an out-of-memory error must not throw finished shards away.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from bild_fairseq.config import (BATCH_POLICY, SETTINGS, THRESHOLDS, BildChoice, BildOptionError,
                                 check_decoding, check_settings)
from bild_fairseq.engines import ENGINES
from bild_fairseq.pairdir import PairSpec
from jobs.shards import plan
from jobs.workdir import write_atomic

#: --max-tokens by the workers' device. CPU: 4096, measured (BENCHMARKS.md). GPU: 16384, chosen,
#: not yet measured on a GPU: a GPU's kernels are busy only with wide batches (at 4096 tokens a
#: step of the shipped models is a ~150 x 256 matmul), and 4x that stays small: the shipped big
#: model (5 decoder layers, 256 wide) caches 5 KiB per target token in fp16, 0.6 GiB for ~600
#: sentences of 200 output tokens. A worker that runs out of memory halves it and goes on.
MAX_TOKENS = {"cpu": 4096, "gpu": 16384}


class ConfigError(ValueError):
    """Options that cannot work together; the message says which and what to do."""


@dataclass(frozen=True)
class Decoding(BildChoice):
    """The decoding options of :class:`bild_fairseq.api.PairTranslator` (None: the pair's recommendation)."""

    mode: str | None = None  # None: BiLD if a BiLD option is given, else the pair's measured default
    small_checkpoint: str | None = None
    beam: int = 1
    max_len_a: float | None = None
    max_len_b: int | None = None
    precision: str = "fp32"  # both models: fp32, fp16 (GPU) or bf16 (bild_fairseq.precision)
    no_repeat_ngram_size: int | None = None
    engine: str | None = None  # None: the pair's measured default (pair.json's "run"), else torch
    int8: bool | None = None  # 8-bit weights (onnxruntime); None: the pair's measured default, else no

    def __post_init__(self) -> None:
        if self.mode not in (None, "bild") and self.bild_given():
            raise ConfigError("--bild-exact, the BiLD thresholds and batch policy apply to BiLD decoding, not to "
                              "--big-only/--small-only baselines: drop them or drop the baseline flag")
        if self.exact and any(getattr(self, t) is not None for t in THRESHOLDS):
            raise ConfigError("--bild-exact reproduces the big model's output and takes no thresholds: "
                              "give either --bild-exact or --fallback-threshold/--rollback-threshold/--max-small-steps")
        if self.mode == "big" and self.small_checkpoint is not None:
            raise ConfigError("--small-checkpoint has no effect with --big-only: drop it")
        if self.engine is not None and self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        try:  # the API's own check; an int8 without an engine yet is settled by resolve()
            check_decoding(self.mode, self.beam, self.precision, self.engine,
                           self.int8 if self.engine is not None else None)
        except BildOptionError as e:
            raise ConfigError(str(e)) from None

    def resolve(self, spec: PairSpec) -> "Decoding":
        """The mode in effect: the one given; else BiLD when a BiLD option is given; else the
        pair's measured default (pair.json's "run": {"mode": ...}), else BiLD. The engine and
        precision likewise: given, else the pair's ("run": {"engine", "precision"}) where it
        fits (greedy, fp32 models), else torch."""
        mode = self.mode or ("bild" if self.bild_given() else spec.run.get("mode", "bild"))
        engine, int8 = self.engine, self.int8
        if engine is None:
            engine = spec.run.get("engine", "torch") if self.beam == 1 and self.precision == "fp32" else "torch"
        if int8 is None:
            int8 = engine == spec.run.get("engine") == "onnxruntime" and spec.run.get("precision") == "int8"
        return replace(self, mode=mode, engine=engine, int8=int8)

    def check_pair(self, spec: PairSpec) -> None:
        """Refuse, before any work, what every worker would fail on: a missing model file, or
        thresholds (given, or pair.json's) outside their range."""
        spec.check(*self.model_files(spec))
        if self.resolve(spec).mode == "bild":
            given = {k: getattr(self, k) for k in SETTINGS if getattr(self, k) is not None}
            try:
                check_settings({**spec.bild, **given})
            except BildOptionError as e:
                raise ConfigError(f"{e} (from the command line, or {spec.directory / 'pair.json'})") from None

    def canonical(self, spec: PairSpec) -> "Decoding":
        """The same decoding with every option that equals the pair's own (pair.json's thresholds,
        length limits and small model) written as None, "the pair's": giving pair.json's value on
        the command line is then not a change of configuration on resume."""
        pair = {**spec.bild, **spec.generation, "small_checkpoint": spec.small}
        return replace(self, **{k: None for k in pair if getattr(self, k, None) is not None
                                and getattr(self, k) == pair[k]})

    def model_files(self, spec: PairSpec) -> list[str]:
        """The checkpoint files of the pair directory this decoding reads."""
        small = self.small_checkpoint or spec.small
        return {"bild": [spec.big, small], "big": [spec.big], "small": [small]}[self.resolve(spec).mode]

    def translator_kwargs(self) -> dict:
        return {**asdict(self), "engine": self.engine or "torch", "int8": bool(self.int8)}


def pair_fingerprint(spec: PairSpec, decoding: Decoding, digest: Callable[[Path], str]) -> dict:
    """Content digests of every pair file this decoding uses, and under "pair.json" a digest of
    the pair.json settings its output depends on: not the run's default mode and its reasons, nor
    the BiLD batch policy, nor which small models share the big encoder (sharing changes no output),
    and the BiLD thresholds only when decoding with BiLD (re-tuning BiLD leaves a big-only run
    resumable). The model file names count through their digests."""
    names = [f"dict.{spec.source_lang}.txt", f"dict.{spec.target_lang}.txt", *decoding.model_files(spec),
             *spec.text_files()]
    # an empty "text" (the legacy keys declare the pipeline) leaves earlier work directories' digest as it was
    settings = {k: v for k, v in asdict(spec).items()
                if k not in ("directory", "big", "small", "bild", "run", "shared_encoder") and not (k == "text" and not v)}
    if decoding.resolve(spec).mode == "bild":
        settings["bild"] = {k: v for k, v in spec.bild.items() if k not in BATCH_POLICY}
    text = json.dumps(settings, sort_keys=True, default=str).encode()
    return {**{name: digest(spec.directory / name) for name in sorted(set(names))},
            "pair.json": hashlib.sha256(text).hexdigest()}


@dataclass
class RunConfig:
    """``config.json`` of a work directory: what workers read, and what resume compares."""

    input: str
    input_sha256: str
    lines: int
    shards: int
    pair_dir: str
    task: str
    pair_fingerprint: dict
    decoding: Decoding
    output: str
    max_tokens: int = 4096
    max_sentences: int | None = None
    device: str = "auto"
    chunk_lines: int = 500  # a worker publishes its output every this many lines: a rerun resumes there
    hash: str = field(default="", compare=False)

    HASHED = ("input_sha256", "lines", "shards", "pair_fingerprint", "decoding")

    def __post_init__(self) -> None:
        if isinstance(self.decoding, dict):
            decoding = dict(self.decoding)
            if "fp16" in decoding:  # a work directory from before --precision
                decoding["precision"] = "fp16" if decoding.pop("fp16") else "fp32"
            self.decoding = Decoding(**decoding)
        self.hash = hashlib.sha256(json.dumps(self.hashed(), sort_keys=True).encode()).hexdigest()[:16]

    def hashed(self) -> dict:
        """What the output depends on: not the batching, and not the BiLD batch policy (it decides
        only when the big model runs), so a resumed run may change those."""
        data = asdict(self)
        data["decoding"] = {k: v for k, v in data["decoding"].items() if k not in BATCH_POLICY}
        # the torch engine in fp32 is what every run did before engines existed: leaving it out
        # keeps those work directories resumable
        if data["decoding"].get("engine") in (None, "torch") and not data["decoding"].get("int8"):
            data["decoding"].pop("engine", None)
            data["decoding"].pop("int8", None)
        if data["decoding"].get("no_repeat_ngram_size") is None:  # not given: as before the option existed
            data["decoding"].pop("no_repeat_ngram_size", None)
        # fp32 and fp16 hash as the fp16 flag before --precision did: those work directories resume
        precision = data["decoding"].pop("precision")
        data["decoding"].update({"precision": precision} if precision == "bf16" else {"fp16": precision == "fp16"})
        return {key: data[key] for key in self.HASHED}

    def ranges(self) -> list[range]:
        return plan(self.lines, self.shards)

    def differences(self, other: "RunConfig") -> list[str]:
        """Human-readable hashed settings that differ from ``other``'s (for the refusal message)."""
        mine, theirs = _flatten(self.hashed()), _flatten(other.hashed())
        return [f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in sorted(mine.keys() | theirs.keys())
                if mine.get(k) != theirs.get(k)]

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
