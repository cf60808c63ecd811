"""Corpus-level metrics on detokenized text, with sacrebleu's reproducibility signatures."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import sacrebleu


@dataclass(frozen=True)
class Score:
    name: str
    value: float
    signature: str

    def to_dict(self) -> dict:
        return asdict(self)


def _check_aligned(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references: score line-aligned files")


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> Score:
    """sacrebleu BLEU (13a tokenization, exp smoothing), as ``sacrebleu REF < HYP`` computes it."""
    _check_aligned(hyps, refs)
    metric = sacrebleu.metrics.BLEU()
    return Score("BLEU", metric.corpus_score(list(hyps), [list(refs)]).score, str(metric.get_signature()))


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> Score:
    _check_aligned(hyps, refs)
    metric = sacrebleu.metrics.CHRF()
    return Score("chrF", metric.corpus_score(list(hyps), [list(refs)]).score, str(metric.get_signature()))


def rouge(hyps: Sequence[str], refs: Sequence[str]) -> list[Score]:
    """ROUGE-1/2/L F-measure x100 (rouge-score, Porter stemming), averaged over documents."""
    from rouge_score import rouge_scorer

    _check_aligned(hyps, refs)
    kinds = ["rouge1", "rouge2", "rougeL"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for hyp, ref in zip(hyps, refs):
        for kind, s in scorer.score(ref, hyp).items():
            totals[kind] += s.fmeasure
    n = max(len(hyps), 1)
    sig = "rouge-score|stemmer:porter|fmeasure|avg:docs"
    return [Score(k.replace("rouge", "ROUGE-"), 100 * totals[k] / n, sig) for k in kinds]


#: the metrics score_task reports per task, and the one quality targets and comparisons use
METRICS = {"translation": ("BLEU", "chrF"), "summarization": ("ROUGE-1", "ROUGE-2", "ROUGE-L")}
PRIMARY_METRIC = {"translation": "BLEU", "summarization": "ROUGE-L"}


def score_task(task: str, hyps: Sequence[str], refs: Sequence[str]) -> list[Score]:
    """The project's metrics for a task: BLEU+chrF for translation, ROUGE for summarization."""
    return rouge(hyps, refs) if task == "summarization" else [bleu(hyps, refs), chrf(hyps, refs)]
