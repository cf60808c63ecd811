"""BiLD's generation options. The ``help=`` strings are the ``fairseq-generate --help`` text."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from fairseq.dataclass import FairseqDataclass


@dataclass
class BildConfig(FairseqDataclass):
    bild: bool = field(
        default=False,
        metadata={"help": "decode with Big Little Decoder: --path is the big model, --bild-small-path the small one"},
    )
    bild_small_path: Optional[str] = field(
        default=None, metadata={"help": "BiLD: the small model's checkpoint (same target dictionary as --path)"}
    )
    bild_fallback_threshold: float = field(
        default=0.6,
        metadata={"help": "BiLD: hand over to the big model when the small model's max probability is below this "
                          "(0: never for confidence, 1: always)"},
    )
    bild_rollback_threshold: float = field(
        default=5.0,
        metadata={"help": "BiLD: roll back a small-model token when the big model's cross-entropy on it, "
                          "-log p_big(token), exceeds this (0: any token the big model is not certain of)"},
    )
    bild_max_small_steps: int = field(
        default=10, metadata={"help": "BiLD: hand over to the big model after this many consecutive small-model tokens"}
    )
    bild_wait_share: float = field(
        default=0.0,
        metadata={"help": "BiLD batch policy: a sentence that hands over waits, frozen, until this share of the "
                          "batch's unfinished sentences waits; then one big-model pass verifies them all "
                          "(0: run the big model as soon as any sentence needs it). Changes speed, not output"},
    )
    bild_max_wait: int = field(
        default=1000,
        metadata={"help": "BiLD batch policy: run the big model anyway once a sentence has waited this many "
                          "loop iterations"},
    )
    bild_verify_drafting: bool = field(
        default=False,
        metadata={"help": "BiLD batch policy: each big-model pass also checks the still-drafting sentences' "
                          "unchecked tokens (a rejection then cuts at once). Changes speed, not output"},
    )
    bild_exact: bool = field(
        default=False,
        metadata={"help": "BiLD: roll back on any disagreement with the big model's argmax; output then equals "
                          "the big model's greedy decoding"},
    )
    bild_engine: str = field(
        default="torch",
        metadata={"help": "runtime of the greedy loop's models: torch (the checkpoints as they are, any device) or "
                          "onnxruntime (both models exported once to ONNX graphs, cached by checksum; CPU; faster, "
                          "figures in BENCHMARKS.md). "
                          "Without --bild, onnxruntime decodes greedily with the --path model"},
    )
    bild_int8: bool = field(
        default=False,
        metadata={"help": "with --bild-engine onnxruntime: 8-bit weights (MatMulNBits) for both models; faster at "
                          "small batches, output close to but not identical with fp32 (BENCHMARKS.md)"},
    )
    bild_onnx_cache: Optional[str] = field(
        default=None,
        metadata={"help": "directory of exported ONNX graphs (default $BILD_ONNX_CACHE, else "
                          "~/.cache/bild-fairseq/onnx); an export takes seconds, once per checkpoint and precision"},
    )
    bild_stats_json: Optional[str] = field(
        default=None, metadata={"help": "BiLD: write the run's decoding statistics to this JSON file at exit"}
    )


BILD_FIELDS = tuple(f.name for f in fields(BildConfig))
#: the runtime options (--bild-engine, --bild-int8, --bild-onnx-cache): they also apply without --bild
RUNTIME = ("engine", "int8", "onnx_cache")
#: BiLD's settings: pair.json's "bild" keys, PairTranslator's and the generator's keywords, and
#: (prefixed with bild_) the --bild-* options. The batch policy changes speed, never output.
THRESHOLDS = ("fallback_threshold", "rollback_threshold", "max_small_steps")
BATCH_POLICY = ("wait_share", "max_wait", "verify_drafting")
SETTINGS = THRESHOLDS + BATCH_POLICY
DEFAULTS = {name: BildConfig.__dataclass_fields__[f"bild_{name}"].default for name in SETTINGS}


@dataclass(frozen=True, kw_only=True)
class BildChoice:
    """BiLD's settings as a caller chooses them, a field per SETTINGS name plus ``exact``; None
    takes the pair's value (pair.json's "bild"). The runner's decoding options and the
    benchmark's variants are both made of it."""

    exact: bool = False
    fallback_threshold: Optional[float] = None
    rollback_threshold: Optional[float] = None
    max_small_steps: Optional[int] = None
    wait_share: Optional[float] = None
    max_wait: Optional[int] = None
    verify_drafting: Optional[bool] = None

    def bild_given(self) -> bool:
        """Whether any BiLD option is chosen (exact, a threshold or the batch policy)."""
        return self.exact or any(getattr(self, name) is not None for name in SETTINGS)


class BildOptionError(ValueError):
    """Invalid or unsupported combination of the plugin's options (--bild-*, --teacher/--kd-weight)."""


#: decoding modes: BiLD, or one model alone (the baselines)
MODES = ("bild", "big", "small")
PRECISIONS = ("fp32", "fp16", "bf16")


def check_decoding(mode: str | None, beam: int, precision: str, engine: str | None, int8: bool | None) -> None:
    """Decoding choices that cannot go together, refused before any model is loaded: one check
    for the API (``PairTranslator``) and the runner's options (``bild-jobs run``). ``mode``,
    ``engine``, ``int8`` None: not chosen yet. Device-dependent refusals: ``precision.check_precision``."""
    if mode is not None and mode not in MODES:
        raise BildOptionError(f"decoding mode must be one of {MODES}, got {mode!r}")
    if mode == "bild" and beam != 1:
        raise BildOptionError(f"BiLD decodes greedily (beam 1), got beam {beam}: "
                              "beam search is for the big-only/small-only baselines")
    if precision not in PRECISIONS:
        raise BildOptionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if int8 and engine != "onnxruntime":
        raise BildOptionError("int8 (8-bit weights) is a precision of the onnxruntime engine: "
                              "choose engine onnxruntime, or drop int8")
    if engine == "onnxruntime" and (beam != 1 or precision != "fp32"):
        raise BildOptionError(f"the onnxruntime engine decodes greedily with fp32 models (asked: beam {beam}, "
                              f"{precision}): use engine torch for beam search, fp16 and bf16")


def check_thresholds(fallback_threshold: float, rollback_threshold: float, max_small_steps: int) -> None:
    if not 0.0 <= fallback_threshold <= 1.0:
        raise BildOptionError(f"--bild-fallback-threshold must be in [0, 1] (a probability), got {fallback_threshold}")
    if rollback_threshold < 0:
        raise BildOptionError(f"--bild-rollback-threshold must be >= 0 (a cross-entropy in nats), got {rollback_threshold}")
    if max_small_steps < 1:
        raise BildOptionError(f"--bild-max-small-steps must be >= 1, got {max_small_steps}")


def check_settings(settings: dict) -> None:
    """Validate a "bild" settings dict (pair.json's, or overrides of it); absent keys take DEFAULTS."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise BildOptionError(f"unknown BiLD setting(s) {', '.join(unknown)}: known are {', '.join(SETTINGS)}")
    full = {**DEFAULTS, **settings}
    check_thresholds(*(full[k] for k in THRESHOLDS))
    check_batch_policy(full["wait_share"], full["max_wait"])


def check_batch_policy(wait_share: float, max_wait: int) -> None:
    if not 0.0 <= wait_share <= 1.0:
        raise BildOptionError(f"--bild-wait-share must be in [0, 1] (a share of the batch), got {wait_share}")
    if max_wait < 1:
        raise BildOptionError(f"--bild-max-wait must be >= 1 (loop iterations), got {max_wait}")
