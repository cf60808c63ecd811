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
#: Floors well below the shipped models' measured test scores (data/pairs/*/report.md) and far
#: above what a broken or untrained model reaches (BLEU/ROUGE-L near 0).
PAIRS = {
    "deen": ("lohelp.de-en.test.de.xz", "lohelp.de-en.test.en.xz", "BLEU", None),
    "summ": ("debdesc.test.src.xz", "debdesc.test.tgt.xz", "ROUGE-L", None),
}


def read(name, n=LINES):
    with lzma.open(ROOT / "data" / "corpora" / name, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in islice(f, n)]


@pytest.fixture(scope="module", params=sorted(PAIRS))
def shipped(request):
    pair = ROOT / "data" / "pairs" / request.param
    assert (pair / "pair.json").is_file(), f"shipped pair {pair} is missing: python data/train.py {request.param}"
    return request.param, pair


def test_big_model_scores_above_floor_and_beats_small(shipped):
    name, pair = shipped
    src, ref, metric, floor = PAIRS[name]
    sources, refs = read(src), read(ref)
    scores = {}
    for mode in ("big", "small"):
        t = PairTranslator.from_pair_dir(pair, mode=mode)
        out = t.translate(sources)
        assert len(out.hypotheses) == len(sources)
        scores[mode] = next(s.value for s in score_task(t.spec.task, out.hypotheses, refs) if s.name == metric)
    assert scores["big"] >= floor, scores
    assert scores["big"] > scores["small"], scores


def test_exact_bild_equals_stock_big_greedy_on_shipped_pair(shipped):
    name, pair = shipped
    sources = read(PAIRS[name][0], 40)
    t = PairTranslator.from_pair_dir(pair, mode="bild", exact=True)
    big = t.generator.model.single_model
    stock = SequenceGenerator([big], t.task.target_dictionary, beam_size=1, max_len_b=200)
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
