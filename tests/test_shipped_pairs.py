"""Real-quality checks on the shipped, trained pairs in data/pairs (kept small for CI)."""
import lzma
from itertools import islice

import pytest
import torch
from fairseq.data import data_utils
from fairseq.sequence_generator import SequenceGenerator

from bild_fairseq.api import PairTranslator
from bild_fairseq.scoring import score_task
from tiny import ROOT

LINES = 100
#: (source, reference, metric, floor for the big model, required margin of big over small).
#: Floors sit well below the shipped big models' scores on these 100 lines (de-en BLEU 22.9,
#: summarization ROUGE-L 15.9; full test splits in data/pairs/*/report.md) and above what a broken
#: or random model reaches (~0). Both small models are the distilled small-aligned.pt (de-en BLEU
#: 17.7 here). The summarization big model does not beat its distilled small model, on valid
#: or on test (16.41 vs 16.87 ROUGE-L on the full test split: data/pairs/summ/TRAINING.md), so
#: no margin is asserted for it.
PAIRS = {
    "deen": ("lohelp.de-en.test.de.xz", "lohelp.de-en.test.en.xz", "BLEU", 15.0, 3.0),
    "summ": ("debdesc.test.src.xz", "debdesc.test.tgt.xz", "ROUGE-L", 8.0, None),
}


def read(name, n=LINES):
    with lzma.open(ROOT / "data" / "corpora" / name, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in islice(f, n)]


@pytest.fixture(scope="module", params=sorted(PAIRS))
def shipped(request):
    pair = ROOT / "data" / "pairs" / request.param
    assert (pair / "pair.json").is_file(), f"shipped pair {pair} is missing: python data/train.py {request.param}"
    return request.param, pair


def test_big_model_scores_above_floor_and_beats_small_by_margin(shipped):
    name, pair = shipped
    src, ref, metric, floor, margin = PAIRS[name]
    sources, refs = read(src), read(ref)
    scores = {}
    for mode in ("big", "small"):
        t = PairTranslator.from_pair_dir(pair, mode=mode)
        out = t.translate(sources)
        assert len(out.hypotheses) == len(sources)
        scores[mode] = next(s.value for s in score_task(t.spec.task, out.hypotheses, refs) if s.name == metric)
    assert scores["big"] >= floor, scores
    if margin is not None:
        assert scores["big"] >= scores["small"] + margin, scores


def test_exact_bild_equals_stock_big_greedy_on_shipped_pair(shipped):
    name, pair = shipped
    sources = read(PAIRS[name][0], 40)
    t = PairTranslator.from_pair_dir(pair, mode="bild", exact=True)
    big = t.generator.model.single_model
    stock = SequenceGenerator([big], t.task.target_dictionary, beam_size=1, **t.spec.generation)
    pipe, d = t.spec.text_pipeline(), t.task.source_dictionary
    encoded = [d.encode_line(pipe.encode(s), add_if_not_exist=False).long()[-t.max_source_tokens:] for s in sources]

    def run(gen, batch):
        out = []
        for i in range(0, len(encoded), batch):
            chunk = encoded[i:i + batch]
            sample = {"net_input": {"src_tokens": data_utils.collate_tokens(chunk, d.pad(), d.eos(), left_pad=True),
                                    "src_lengths": torch.tensor([c.numel() for c in chunk])}}
            with torch.no_grad():
                out += [h[0]["tokens"].tolist() for h in gen.generate([big], sample)]
        return out

    reference = run(stock, 1)
    for batch in (1, 3, 16):
        assert run(t.generator, batch) == reference
    assert t.generator.stats.small_tokens > 0  # the small model did real work
