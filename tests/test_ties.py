"""The near-tie counter behind GPU decoding's exactness contract (jobs.tuning.ties), on a
constructed near tie: CPU tests elsewhere stay strict; this is what a CUDA comparison counts."""
import torch

from bild_fairseq.api import PairTranslator
from jobs.tuning.measure import encode
from jobs.tuning.ties import MARGIN, near_ties, summary
from jobs_fixtures import CORPUS, real_lines


def test_a_constructed_near_tie_is_counted_and_a_real_difference_is_not(tiny_pair):
    t = PairTranslator.from_pair_dir(tiny_pair, mode="big")
    model, eos = t.generator.model.single_model, t.task.target_dictionary.eos()
    sources = encode(t, [line.decode() for line in real_lines(CORPUS, 3)])
    # a tie at every step: the output row of a second token becomes the first output token's own
    reference = [h["tokens"] for h in t.generate_batch(sources)]
    first = int(reference[0][0])
    twin = first + 1 if first + 1 != eos else first + 2
    with torch.no_grad():
        model.decoder.output_projection.weight[twin] = model.decoder.output_projection.weight[first]
    reference = [h["tokens"] for h in t.generate_batch(sources)]  # the twin never wins a tie: argmax takes the first
    assert int(reference[0][0]) == first
    tied = reference[0].clone()
    tied[0] = twin  # what another kernel's rounding could have chosen
    changed = reference[1].clone()
    changed[-1] = twin  # instead of the final EOS, which the model clearly preferred (no tie there)
    report = near_ties(model, sources, [tied, changed, reference[2]], reference, eos)
    assert (report["lines"], report["differing"], report["near_ties"], report["margin"]) == (3, 2, 1, MARGIN["fp32"])
    assert report["largest_gap"] > MARGIN["fp32"]  # the changed line's gap: a real preference
    # the margin follows the precision: a gap of 0.05 is a near tie in bf16, not in fp16 or fp32
    assert [summary([0.0, 0.05], 2, MARGIN[p])["near_ties"] for p in ("fp32", "fp16", "bf16")] == [1, 1, 2]
