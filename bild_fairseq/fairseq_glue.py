"""Everything that touches fairseq internals, in one place (README: "How the plugin hooks in").

fairseq builds ``fairseq-generate``'s options and ``cfg.generation`` from the GenerationConfig
dataclass, and builds the generator in ``FairseqTask.build_generator``. A ``--user-dir`` plugin
is imported before either happens, so three small hooks make ``--bild`` work with the ordinary
``--task translation`` (or any task that uses FairseqTask.build_generator), a fourth and a
seventh mend upstream bugs (lost sentences; ``--no-repeat-ngram-size`` ignored on the CPU), a
fifth keeps a user's mistake to one line, and a sixth honours ``--bf16``:

1. BildConfig's fields are added to GenerationConfig (their ``help=`` becomes ``--help``), and
   hydra's config store is refreshed so ``cfg.generation.bild*`` survive namespace conversion;
2. ``FairseqTask.build_generator`` builds a :class:`BildSequenceGenerator` when ``--bild`` is set,
   or a one-model one when ``--bild-engine onnxruntime`` is (greedy decoding on that engine), and is
   untouched otherwise;
3. ``checkpoint_utils.load_checkpoint_to_cpu`` turns torch's weights-only refusal into a clear
   :class:`UnsafeCheckpointError`. The allow-list itself is torch's public add_safe_globals;
4. ``data_utils.batch_by_size`` keeps the last batch: fairseq 0.12's compiled batcher drops it
   unless its size is a multiple of ``--required-batch-size-multiple`` (fairseq issues #5036,
   #5351), so ``fairseq-generate`` silently translated 96 of 100 sentences at ``--batch-size 16``.
   With the plugin loaded every run (with or without ``--bild``) decodes every sentence.
5. ``sys.excepthook``: fairseq's entry points do not catch errors, so a bad ``--bild-*`` option
   or small checkpoint (:class:`BildOptionError`, :class:`CheckpointError`,
   :class:`UnsafeCheckpointError`, whose messages say what to do) would end under a 30-line
   traceback; uncaught, they print as ``PROG: error: MESSAGE`` (exit status 1, like argparse's
   errors). Every other exception keeps its traceback.
6. ``BaseFairseqModel.prepare_for_inference_``, which fairseq-generate and fairseq-interactive
   call with the whole config once a model is loaded (halved for ``--fp16``, on its device):
   fairseq 0.12 ignores ``--bf16`` there, so the plugin converts each ``--path`` model to
   bfloat16, with or without ``--bild`` (the small model follows the big one's dtype); and it
   refuses ``--fp16`` on the CPU for ``--bild``/``--bild-engine`` decoding (stock decoding keeps
   fairseq's own behaviour there).
7. ``NGramRepeatBlock._no_repeat_ngram`` (``--no-repeat-ngram-size`` without fairseq's CUDA
   extension) is given the generated prefix: SequenceGenerator passes its whole padded token
   buffer, so the CPU path compared padding with the prefix's n-grams and banned nothing
   (fairseq issue #4709), and a looping model kept looping. With the plugin loaded stock decoding
   bans what the option promises, as BiLD does (:mod:`bild_fairseq.ngrams`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pickle
import sys
import typing
import weakref

import torch

from bild_fairseq.checkpoints import CheckpointError
from bild_fairseq.config import BILD_FIELDS, RUNTIME, SETTINGS, BildConfig, BildOptionError
from bild_fairseq.safe_load import UnsafeCheckpointError, allow_fairseq_checkpoints, explain_refusal
from bild_fairseq.stats import BildStats

logger = logging.getLogger("bild_fairseq")
_installed = False


def install() -> None:
    """Apply the seven hooks (idempotent)."""
    global _installed
    if _installed:
        return
    allow_fairseq_checkpoints()
    _add_generation_options()
    _hook_build_generator()
    _hook_checkpoint_loading()
    _hook_batch_by_size()
    _hook_excepthook()
    _hook_prepare_for_inference()
    _hook_ngram_blocking()
    _installed = True


def _add_generation_options() -> None:
    from fairseq.dataclass.configs import GenerationConfig
    from fairseq.dataclass.initialize import hydra_init

    hints = typing.get_type_hints(BildConfig)
    for name in BILD_FIELDS:
        if name not in GenerationConfig.__dataclass_fields__:
            GenerationConfig.__dataclass_fields__[name] = _copy_field(name, hints[name])
            GenerationConfig.__annotations__[name] = hints[name]
            setattr(GenerationConfig, name, BildConfig.__dataclass_fields__[name].default)
    hydra_init()


def _copy_field(name: str, type_) -> dataclasses.Field:
    src = BildConfig.__dataclass_fields__[name]
    f = dataclasses.field(default=src.default, metadata=src.metadata)
    f.name, f.type = name, type_
    f._field_type = dataclasses._FIELD  # a regular field, as @dataclass would mark it
    return f


def bild_options(args) -> dict | None:
    """The BiLD options of a generation config / namespace, or None when the plugin has nothing
    to do (no --bild, the torch engine, fp32)."""
    opts = {name: getattr(args, name, BildConfig.__dataclass_fields__[name].default) for name in BILD_FIELDS}
    if not opts["bild"] and opts["bild_engine"] == "torch" and not opts["bild_int8"]:
        return None
    return opts


def check_search_options(args) -> None:
    """Refuse, before any decoding, the search options BiLD's greedy loop does not implement."""
    refused = {
        "beam": (lambda v: v != 1, "--beam must be 1"),
        "nbest": (lambda v: v != 1, "--nbest must be 1"),
        "sampling": (bool, "--sampling is not supported"),
        "diverse_beam_groups": (lambda v: v is not None and v > 0, "--diverse-beam-groups is not supported"),
        "diversity_rate": (lambda v: v is not None and v > -1, "--diversity-rate is not supported"),
        "match_source_len": (bool, "--match-source-len is not supported"),
        "constraints": (bool, "--constraints is not supported"),
        "prefix_size": (bool, "--prefix-size is not supported"),
        "print_alignment": (bool, "--print-alignment is not supported"),
        "retain_dropout": (bool, "--retain-dropout is not supported"),
        "score_reference": (bool, "--score-reference is not supported"),
        "lm_path": (bool, "--lm-path is not supported"),
    }
    problems = [msg for name, (bad, msg) in refused.items() if bad(getattr(args, name, None) or 0)]
    if getattr(args, "temperature", 1.0) != 1.0:
        problems.append("--temperature must be 1")
    if problems:
        raise BildOptionError("--bild and --bild-engine decode greedily with one big (and one small) model: "
                              + "; ".join(problems))


def load_small_model(path: str | None, task, like: torch.nn.Module) -> torch.nn.Module:
    """Load the small checkpoint for ``task`` with the big model's dtype and device."""
    import os

    from bild_fairseq.checkpoints import CheckpointError, load_model

    if not path:
        raise BildOptionError("--bild needs --bild-small-path SMALL.pt (the small model's checkpoint)")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise BildOptionError(f"--bild-small-path {path}: no such readable file")
    try:
        model = load_model(path, task)
    except CheckpointError as e:
        raise BildOptionError(f"--bild-small-path: {e}") from None
    param = next(like.parameters())
    return model.to(device=param.device, dtype=param.dtype).eval()


def _hook_build_generator() -> None:
    from fairseq.tasks.fairseq_task import FairseqTask

    stock = FairseqTask.build_generator

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, **kwargs):
        opts = bild_options(args)
        if opts is None:
            return stock(self, models, args, seq_gen_cls, extra_gen_cls_kwargs, **kwargs)
        from bild_fairseq.generator import BildSequenceGenerator

        check_search_options(args)
        runtime = {name: opts[f"bild_{name}"] for name in RUNTIME}
        if opts["bild"]:
            small = load_small_model(opts["bild_small_path"], self, models[0])
            bild = {"small_model": small, **{name: opts[f"bild_{name}"] for name in SETTINGS},
                    "exact": opts["bild_exact"]}
        else:  # --bild-engine alone: greedy decoding of the --path model on that engine
            bild = {}
        generator = stock(self, models, args, BildSequenceGenerator,
                          {**(extra_gen_cls_kwargs or {}), **bild, **runtime}, **kwargs)
        # reported when the generator is freed or at exit, whichever comes first; the finalizer
        # holds its statistics, not the generator, so a dropped generator frees its models
        weakref.finalize(generator, report_stats, generator.stats, opts["bild_stats_json"])
        return generator

    FairseqTask.build_generator = build_generator


def report_stats(stats: BildStats, json_path: str | None) -> None:
    """Log a generator's statistics at the end of its run (fairseq-generate has no end-of-run
    hook: the end is when the generator is freed, or the exit) and save them as JSON."""
    if stats.sentences == 0:
        return
    logger.info(stats.summary())
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(stats.to_dict(), f, indent=2)


def _hook_checkpoint_loading() -> None:
    from fairseq import checkpoint_utils

    stock = checkpoint_utils.load_checkpoint_to_cpu

    def load_checkpoint_to_cpu(path, *args, **kwargs):
        try:
            return stock(path, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise explain_refusal(str(path), e) from None

    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


def _hook_batch_by_size() -> None:
    import numpy as np
    from fairseq.data import data_utils

    stock = data_utils.batch_by_size

    @functools.wraps(stock)  # stock's stays reachable as ``__wrapped__``
    def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                      required_batch_size_multiple=1, fixed_shapes=None):
        if not isinstance(indices, np.ndarray):  # an iterator would be spent by the first call
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        batches = stock(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                        required_batch_size_multiple, fixed_shapes)
        if fixed_shapes is not None or required_batch_size_multiple == 1:
            return batches
        if sum(len(b) for b in batches) == len(indices):
            return batches
        # the dropped tail, batched again under the same limits without the multiple
        left = ~np.isin(indices, np.concatenate(batches)) if batches else np.ones(len(indices), dtype=bool)
        vec = None if num_tokens_vec is None else np.asarray(num_tokens_vec)[left]
        return list(batches) + list(stock(indices[left], num_tokens_fn, vec, max_tokens, max_sentences, 1))

    data_utils.batch_by_size = batch_by_size


#: errors whose message is the whole story: what was wrong and what to do
USER_ERRORS = (BildOptionError, CheckpointError, UnsafeCheckpointError)


def _hook_excepthook() -> None:
    previous = sys.excepthook

    def excepthook(kind, error, traceback) -> None:
        if not issubclass(kind, USER_ERRORS):
            return previous(kind, error, traceback)
        print(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {error}", file=sys.stderr)

    sys.excepthook = excepthook


def _hook_prepare_for_inference() -> None:
    from fairseq.models.fairseq_model import BaseFairseqModel

    from bild_fairseq.precision import check_precision

    stock = BaseFairseqModel.prepare_for_inference_

    def prepare_for_inference_(self, cfg) -> None:
        common = getattr(cfg, "common", None)
        if common is not None and getattr(common, "fp16", False):
            if bild_options(cfg.generation) is not None:
                check_precision("fp16", next(self.parameters()).device.type)
        elif common is not None and getattr(common, "bf16", False):
            self.to(torch.bfloat16)
        stock(self, cfg)

    BaseFairseqModel.prepare_for_inference_ = prepare_for_inference_


def _hook_ngram_blocking() -> None:
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    stock = NGramRepeatBlock._no_repeat_ngram

    def _no_repeat_ngram(self, tokens, lprobs, bsz: int, beam_size: int, step: int):
        return stock(self, tokens[:, : step + 1], lprobs, bsz, beam_size, step)

    NGramRepeatBlock._no_repeat_ngram = _no_repeat_ngram
