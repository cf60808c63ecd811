"""Word-level distillation (``--criterion bild_distillation``) on a tiny random pair: the KL term is
the teacher's, teacher-forced on the same positions, and the teacher is neither trained nor saved."""
from __future__ import annotations

import pytest
import torch
from fairseq import checkpoint_utils

from bild_fairseq.checkpoints import CheckpointError
from bild_fairseq.config import BildOptionError
from bild_fairseq.distillation import DistillationCriterion
from bild_fairseq.pairdir import PairSpec
from jobs.tuning.distill import FINETUNE, criterion_flags, finetune


def load(path, bin_dir):
    (model,), _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(bin_dir)})
    return model, task


def batch(task, bpe_dir, n: int = 6):
    """A training batch of the slice's first ``n`` valid pairs (teacher forcing: prev_output_tokens)."""
    from fairseq.data import LanguagePairDataset

    def side(lang, vocab):
        lines = (bpe_dir / f"valid.{lang}").read_text(encoding="utf-8").splitlines()[:n]
        return [vocab.encode_line(line, add_if_not_exist=False).long() for line in lines]
    src, tgt = side("de", task.source_dictionary), side("en", task.target_dictionary)
    data = LanguagePairDataset(src, [len(t) for t in src], task.source_dictionary,
                               tgt, [len(t) for t in tgt], task.target_dictionary)
    return data.collater([data[i] for i in range(n)])


def test_the_loss_is_the_teachers_divergence(tiny_pair, deen_slice):
    bin_dir = deen_slice / "bin"
    teacher, task = load(tiny_pair / "big.pt", bin_dir)
    sample = batch(task, deen_slice / "bpe")
    criterion = DistillationCriterion(task, False, 0.1, teacher=str(tiny_pair / "big.pt"), kd_weight=1.0)
    assert list(criterion.parameters()) == [] and criterion.state_dict() == {}  # nothing of the teacher is saved

    # the student that is the teacher: KL 0 at every position, so the whole loss is 0
    loss, size, log = criterion(teacher.eval(), sample)
    assert size == sample["ntokens"] and abs(loss.item()) < 1e-3 and abs(log["kl"].item()) < 1e-3

    # another student: KL > 0, gradients reach the student only
    student, _ = load(tiny_pair / "small.pt", bin_dir)
    student.train()
    loss, _, log = criterion(student, sample)
    loss.backward()
    assert loss.item() > 1 and log["kl"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in criterion.teacher.parameters())
    # accuracy counts the student's argmax against the targets, non-padding positions only
    student.eval()
    _, _, log = criterion(student, sample)
    lprobs = student.get_normalized_probs(student(**sample["net_input"]), log_probs=True)
    mask = sample["target"].ne(task.target_dictionary.pad())
    assert log["total"] == mask.sum().item()
    assert log["n_correct"] == lprobs.argmax(-1)[mask].eq(sample["target"][mask]).sum().item()

    # kd_weight 0 is fairseq's label-smoothed cross-entropy
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
    plain = DistillationCriterion(task, False, 0.1, teacher=str(tiny_pair / "big.pt"), kd_weight=0.0)
    stock = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    assert plain(student, sample)[0].item() == pytest.approx(stock(student, sample)[0].item(), rel=1e-6)


def test_bad_teacher_options_are_one_line(tiny_pair, tiny_summ_pair, deen_slice):
    _, task = load(tiny_pair / "big.pt", deen_slice / "bin")
    with pytest.raises(BildOptionError, match="needs --teacher"):
        DistillationCriterion(task, False, 0.1, teacher="", kd_weight=0.5)
    with pytest.raises(BildOptionError, match="between 0 and 1"):
        DistillationCriterion(task, False, 0.1, teacher=str(tiny_pair / "big.pt"), kd_weight=2.0)
    with pytest.raises(CheckpointError, match="distil with the teacher's own dictionaries"):
        DistillationCriterion(task, False, 0.1, teacher=str(tiny_summ_pair / "big.pt"), kd_weight=0.5)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        DistillationCriterion(task, False, 0.1, teacher=str(tiny_pair / "missing.pt"), kd_weight=0.5)


def test_fairseq_train_distils_with_the_teacher(tiny_pair, deen_slice, tmp_path):
    """Step 2 of ``bild-jobs distill --word-kd``: stock fairseq-train, the criterion from --user-dir."""
    spec = PairSpec.load(tiny_pair)
    assert criterion_flags(spec, 0.0) == ["--criterion", "label_smoothed_cross_entropy"]
    options = ["--lr", "0.01", "--warmup-updates", "1", "--max-tokens", "2048", "--max-update", "2",
               "--dropout", "0", *criterion_flags(spec, 0.5)]
    best = finetune(spec, tiny_pair / "small.pt", deen_slice / "bin", tmp_path, options, threads=1)
    log = (tmp_path / "train.log").read_text()
    assert "bild_distillation" in log and "num_updates 2" in log
    assert "| kl " in log and "| accuracy " in log  # the teacher's divergence and the agreement are logged
    state = torch.load(best)
    assert state["cfg"]["criterion"]["kd_weight"] == 0.5 and "label_smoothed_cross_entropy" not in FINETUNE
    assert {k: v.shape for k, v in state["model"].items()} == \
        {k: v.shape for k, v in torch.load(tiny_pair / "small.pt")["model"].items()}  # the student, not the teacher


def test_a_token_the_teacher_rules_out_adds_nothing_to_the_divergence():
    """fairseq sets suppressed tokens' log-probabilities to -inf: p * (log p - log q) is NaN there."""
    import math

    from bild_fairseq.distillation import kl_divergence

    teacher = torch.tensor([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]]).log()  # -inf where 0
    student = torch.tensor([[0.5, 0.25, 0.25], [0.6, 0.3, 0.1]]).log().requires_grad_()
    kl = kl_divergence(teacher, student)
    expected = torch.tensor([0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.25), math.log(1 / 0.6)])
    torch.testing.assert_close(kl, expected)
    kl.sum().backward()
    assert torch.isfinite(student.grad).all()
