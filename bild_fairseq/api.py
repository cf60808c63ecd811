"""Decode raw text with a pair directory in a few lines (what the batch runner and demo use).

    from bild_fairseq.api import PairTranslator
    t = PairTranslator.from_pair_dir("data/pairs/deen")          # BiLD, pair.json's thresholds
    print(t.translate(["Klicken Sie auf OK."]).hypotheses)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

import bild_fairseq  # noqa: F401  (installs the checkpoint allow-list and options)
from bild_fairseq.checkpoints import load_model
from bild_fairseq.config import DEFAULTS, BildOptionError, check_decoding, check_settings
from bild_fairseq.pairdir import GENERATION_DEFAULTS, PairSpec
from bild_fairseq.precision import DTYPES, check_precision
from bild_fairseq.stats import BildStats

logger = logging.getLogger("bild_fairseq")


@dataclass(frozen=True)
class LineIssue:
    index: int
    kind: str  # "empty" | "truncated"
    detail: str


@dataclass
class TranslationOutput:
    hypotheses: list[str]
    issues: list[LineIssue] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


@dataclass
class PairTranslator:
    spec: PairSpec
    task: object
    generator: object
    max_source_tokens: int  # the models' source position limit, EOS included
    settings: dict
    device: str

    @classmethod
    def from_pair_dir(cls, pair_dir: str | Path, mode: str = "bild", small_checkpoint: str | None = None,
                      big_checkpoint: str | Path | None = None,
                      exact: bool = False, fallback_threshold: float | None = None,
                      rollback_threshold: float | None = None, max_small_steps: int | None = None,
                      wait_share: float | None = None, max_wait: int | None = None,
                      verify_drafting: bool | None = None,
                      beam: int = 1, device: str = "cpu", precision: str = "fp32",
                      max_len_a: float | None = None, max_len_b: int | None = None,
                      no_repeat_ngram_size: int | None = None,
                      engine: str = "torch", int8: bool = False, onnx_cache: str | None = None) -> "PairTranslator":
        """Load a pair directory. ``mode`` "big"/"small" decode with one model (baselines).
        ``small_checkpoint``/``big_checkpoint`` replace the pair's models: a file name in the
        directory, or a path elsewhere (e.g. a training checkpoint trained on the pair's dictionaries).
        ``precision``: fp32, fp16 (GPU only) or bf16, for every model loaded.
        ``engine``/``int8``/``onnx_cache``: the runtime of greedy decoding (bild_fairseq.engines).
        ``no_repeat_ngram_size``: fairseq's option, for models that loop [pair.json's "generation", else 0]."""
        from fairseq.tasks.translation import TranslationConfig, TranslationTask

        from bild_fairseq.generator import BildSequenceGenerator

        check_decoding(mode, beam, precision, engine, int8)
        check_precision(precision, device)
        if engine == "onnxruntime" and device != "cpu":
            raise BildOptionError(f"the onnxruntime engine runs on the CPU (asked: {device}): use engine torch there")
        spec = PairSpec.load(pair_dir)
        small_name, big_name = small_checkpoint or "small", str(big_checkpoint or "big")
        paths = {"bild": [big_name, small_name], "big": [big_name], "small": [small_name]}[mode]
        files = [spec.model_path(p) for p in paths]  # clear error on a missing model file
        task = TranslationTask.setup_task(TranslationConfig(data=str(spec.directory), source_lang=spec.source_lang,
                                                            target_lang=spec.target_lang))
        models = []
        for path in files:
            model = load_model(path, task)
            models.append(model.to(device=device, dtype=DTYPES[precision]).eval())
        given = {"fallback_threshold": fallback_threshold, "rollback_threshold": rollback_threshold,
                 "max_small_steps": max_small_steps, "wait_share": wait_share, "max_wait": max_wait,
                 "verify_drafting": verify_drafting}
        bild = {**DEFAULTS, **spec.bild, **{k: v for k, v in given.items() if v is not None}}
        check_settings(bild)
        gen = {k: spec.generation.get(k, default) for k, default in GENERATION_DEFAULTS.items()}
        gen.update({k: v for k, v in {"max_len_a": max_len_a, "max_len_b": max_len_b}.items() if v is not None})
        ngram = spec.generation.get("no_repeat_ngram_size", 0) if no_repeat_ngram_size is None else no_repeat_ngram_size
        if ngram:  # fairseq's --no-repeat-ngram-size (0, the default, is left out of the settings)
            gen["no_repeat_ngram_size"] = ngram
        big, small = (models[0] if mode != "small" else None), (models[-1] if mode != "big" else None)
        generator = build_generator(task, mode, big, small, bild=bild, gen=gen, exact=exact, beam=beam,
                                    engine=engine, int8=int8, onnx_cache=onnx_cache)
        settings = {"pair": str(Path(pair_dir).resolve()), "mode": mode, "models": [p.name for p in files],
                    "beam": beam, "precision": precision, **gen}
        if isinstance(generator, BildSequenceGenerator):  # the engine that actually runs (after fallback)
            settings.update(engine=generator.big.name, precision=generator.big.precision)
        if mode == "bild":
            settings.update(exact=exact, **bild)
            if files[1].name in spec.shared_encoder and not generator.shared_encoder:
                logger.warning("%s was trained on the big model's encoder but %s's encoder differs: it runs its own "
                               "copy (correct, slower); distil it again for this big model", files[1].name, files[0].name)
        max_src = min(m.max_positions()[0] for m in models)
        return cls(spec, task, generator, max_src, settings, device)

    def config_dict(self) -> dict:
        """Every decoding setting in effect (the batch runner hashes it)."""
        return dict(self.settings)

    def translate(self, lines: Sequence[str], max_tokens: int = 4096, max_sentences: int | None = None,
                  progress: Callable[[int], None] | None = None) -> TranslationOutput:
        """Raw lines in, detokenized hypotheses out, line-aligned; problems reported per line."""
        pipeline = self.spec.text_pipeline()
        hyps = [""] * len(lines)
        issues: list[LineIssue] = []
        encoded: list[tuple[int, torch.Tensor]] = []
        for i, line in enumerate(lines):
            if not line.strip():
                issues.append(LineIssue(i, "empty", "empty input line: empty output"))
                if progress:
                    progress(1)
                continue
            ids, length = self.encode(line, pipeline)
            if length > ids.numel():
                issues.append(LineIssue(i, "truncated", f"{length} source tokens truncated to the models' "
                                                        f"limit of {self.max_source_tokens}"))
            encoded.append((i, ids))
        stats_before = BildStats(**vars(self.generator.stats)) if hasattr(self.generator, "stats") else None
        for batch in length_batches(encoded, max_tokens, max_sentences):
            for (index, _), hypo in zip(batch, self.generate_batch([ids for _, ids in batch])):
                hyps[index] = pipeline.decode(self.task.target_dictionary.string(hypo["tokens"].int().cpu()))
            if progress:
                progress(len(batch))
        return TranslationOutput(hyps, sorted(issues, key=lambda x: x.index), self._stats_since(stats_before))

    def encode(self, line: str, pipeline=None) -> tuple[torch.Tensor, int]:
        """A raw line's source token ids (EOS included), cut to the models' limit keeping EOS, and
        its length before the cut. ``pipeline``: the pair's text pipeline, when the caller has one."""
        pipeline = pipeline or self.spec.text_pipeline()
        ids = self.task.source_dictionary.encode_line(pipeline.encode(line), add_if_not_exist=False,
                                                      append_eos=True).long()
        length = ids.numel()
        if length > self.max_source_tokens:
            ids = torch.cat([ids[: self.max_source_tokens - 1], ids[-1:]])
        return ids, length

    def generate_batch(self, sources: list[torch.Tensor]) -> list[dict]:
        """Decode one batch of encoded sources (dictionary ids, EOS included): the best hypothesis
        dict per source, in order. ``translate`` calls it per batch; benchmarks time it alone."""
        from fairseq.data import data_utils

        d = self.task.source_dictionary
        src = data_utils.collate_tokens(sources, d.pad(), d.eos(), left_pad=True).to(self.device)
        lengths = torch.tensor([s.numel() for s in sources], device=self.device)
        sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
        with torch.no_grad():
            return [h[0] for h in self.generator.generate(self.generator.model.models, sample)]

    def _stats_since(self, before: BildStats | None) -> dict:
        if before is None:  # stock beam search: no BiLD counters
            return {}
        now = BildStats(**vars(self.generator.stats))
        delta = BildStats(**{k: v - getattr(before, k) for k, v in vars(now).items()})
        return delta.to_dict()


def build_generator(task, mode: str, big: torch.nn.Module | None, small: torch.nn.Module | None, *, bild: dict,
                    gen: dict, exact: bool = False, beam: int = 1, engine: str = "torch", int8: bool = False,
                    onnx_cache: str | None = None):
    """The generator of a decoding mode, on loaded models: BiLD pairs ``big`` with ``small``;
    "big"/"small" decode with that model alone, greedily with the project's loop (the big-only
    baseline BiLD is measured against) or by fairseq's beam search. ``bild``: the thresholds and
    batch policy; ``gen``: max_len_a/b. The API and the benchmarks both build generators here."""
    from fairseq.sequence_generator import SequenceGenerator

    from bild_fairseq.generator import BildSequenceGenerator

    tgt, runtime = task.target_dictionary, {"engine": engine, "int8": int8, "onnx_cache": onnx_cache}
    if mode == "bild":
        return BildSequenceGenerator([big], tgt, small_model=small, exact=exact, beam_size=1, **bild, **gen, **runtime)
    model = big if mode == "big" else small
    if beam == 1:
        return BildSequenceGenerator([model], tgt, beam_size=1, **gen, **runtime)
    return SequenceGenerator([model], tgt, beam_size=beam, **gen)


def length_batches(items: list[tuple[int, torch.Tensor]], max_tokens: int, max_sentences: int | None):
    """Sort by source length (longest first) and cut into batches of at most ``max_tokens``
    padded tokens; the caller restores input order from the indices."""
    items = sorted(items, key=lambda x: -x[1].numel())
    batch: list = []
    for item in items:
        width = max([item[1].numel()] + [b[1].numel() for b in batch[:1]])
        if batch and (width * (len(batch) + 1) > max_tokens or (max_sentences and len(batch) >= max_sentences)):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch
