"""Word-level distillation for ``fairseq-train``: ``--criterion bild_distillation --teacher BIG.pt``.

BiLD's small model pays off when its argmax is the big model's (fewer fallbacks and rollbacks).
Sequence-level distillation (train on the big model's greedy outputs) gives the student one token
per position; the teacher's whole next-token distribution says, in addition, how close the
runner-up was, which is what speculative decoders' distillation uses to raise acceptance
(DistillSpec, Zhou et al. 2024; word-level KD, Kim & Rush 2016). The loss per target token is

    (1 - kd_weight) * label-smoothed CE(student, target) + kd_weight * KL(teacher || student)

with the teacher run teacher-forced on the same batch (no gradient). On the big model's own
greedy outputs the target is the teacher's argmax, so ``accuracy`` in the training log is the
student's agreement with the big model, the figure ``jobs.tuning.agreement`` reports. (No ``from __future__ import annotations``: fairseq
reads the config's field types at run time.)
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fairseq import checkpoint_utils, metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)

from bild_fairseq.checkpoints import CheckpointError
from bild_fairseq.config import BildOptionError


def kl_divergence(t_lprobs: torch.Tensor, lprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the last dimension, from log-probabilities. A token the teacher
    rules out (log-probability -inf: a suppressed token) adds 0, not 0 * inf = NaN."""
    p = t_lprobs.exp()
    return torch.where(p > 0, p * (t_lprobs - lprobs), torch.zeros_like(p)).sum(-1)


@dataclass
class DistillationConfig(LabelSmoothedCrossEntropyCriterionConfig):
    teacher: str = field(default="", metadata={
        "help": "the teacher (big model) checkpoint; it must share the task's dictionaries"})
    kd_weight: float = field(default=0.5, metadata={
        "help": "weight of KL(teacher || student) against the label-smoothed cross-entropy on the targets "
                "(0: sequence-level distillation only, 1: the teacher's distribution only)"})


@register_criterion("bild_distillation", dataclass=DistillationConfig)
class DistillationCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg: bool, label_smoothing: float, teacher: str, kd_weight: float,
                 ignore_prefix_size: int = 0, report_accuracy: bool = False):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy=True)
        if not teacher:
            raise BildOptionError("--criterion bild_distillation needs --teacher BIG_CHECKPOINT")
        if not 0 <= kd_weight <= 1:
            raise BildOptionError(f"--kd-weight {kd_weight}: give a weight between 0 and 1")
        self.kd_weight = kd_weight
        if not Path(teacher).is_file():
            raise CheckpointError(f"--teacher {teacher}: no such checkpoint")
        try:
            (model,), _ = checkpoint_utils.load_model_ensemble([teacher], task=task)
        except RuntimeError as e:
            if "size mismatch" not in str(e):
                raise
            raise CheckpointError(f"--teacher {teacher} does not fit the task's dictionaries ({len(task.source_dictionary)}"
                                  f"/{len(task.target_dictionary)} types): distil with the teacher's own dictionaries") from None
        # Outside the module tree: not trained, not saved into the student's checkpoints.
        object.__setattr__(self, "teacher", model.eval().requires_grad_(False))

    def forward(self, model, sample, reduce: bool = True):
        net_output = model(**sample["net_input"])
        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        ce, nll = label_smoothed_nll_loss(lprobs, target, self.eps, ignore_index=self.padding_idx, reduce=reduce)
        kl = self.teacher_divergence(lprobs, target, sample, next(model.parameters()).dtype)
        if reduce:
            kl = kl.sum()
        loss = (1 - self.kd_weight) * ce.view(kl.shape) + self.kd_weight * kl
        n_correct, total = self.compute_accuracy(model, net_output, sample)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging = {"loss": loss.data, "nll_loss": nll.data, "kl": kl.data, "ntokens": sample["ntokens"],
                   "nsentences": sample["target"].size(0), "sample_size": sample_size,
                   "n_correct": n_correct.item(), "total": total.item()}
        return loss, sample_size, logging

    def teacher_divergence(self, lprobs: torch.Tensor, target: torch.Tensor, sample,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """KL(teacher || student) per target position (zero at padding), teacher-forced like the
        student, the teacher in the student's precision (fairseq-train --fp16/--bf16)."""
        teacher = self.teacher.to(device=lprobs.device, dtype=dtype)
        with torch.no_grad():
            out = teacher(**sample["net_input"])
            t_lprobs = teacher.get_normalized_probs(out, log_probs=True)[:, self.ignore_prefix_size:]
            t_lprobs = t_lprobs.reshape(-1, t_lprobs.size(-1)).to(lprobs.dtype)
        return kl_divergence(t_lprobs, lprobs).masked_fill(target.eq(self.padding_idx), 0.0)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        kl = sum(log.get("kl", 0) for log in logging_outputs)
        metrics.log_scalar("kl", kl / max(ntokens, 1) / math.log(2), ntokens, round=3)
