"""Real-quality checks on the shipped, trained pairs in data/pairs (kept small for CI)."""
import lzma
from itertools import islice

import pytest
import torch
from fairseq.data import data_utils
from fairseq.sequence_generator import SequenceGenerator

from bild_fairseq.api import PairTranslator
from bild_fairseq.generator import BildSequenceGenerator
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


def encode(t: PairTranslator, sources):
    pipe, d = t.spec.text_pipeline(), t.task.source_dictionary
    return [d.encode_line(pipe.encode(s), add_if_not_exist=False).long()[-t.max_source_tokens:] for s in sources]


def run(gen, t: PairTranslator, encoded, batch):
    """Each source's output tokens, decoded ``batch`` sources at a time."""
    d, big, out = t.task.source_dictionary, t.generator.model.single_model, []
    for i in range(0, len(encoded), batch):
        chunk = encoded[i:i + batch]
        sample = {"net_input": {"src_tokens": data_utils.collate_tokens(chunk, d.pad(), d.eos(), left_pad=True),
                                "src_lengths": torch.tensor([c.numel() for c in chunk])}}
        with torch.no_grad():
            out += [h[0]["tokens"].tolist() for h in gen.generate([big], sample)]
    return out


def test_exact_bild_equals_stock_big_greedy_on_shipped_pair(shipped):
    name, pair = shipped
    t = PairTranslator.from_pair_dir(pair, mode="bild", exact=True)
    stock = SequenceGenerator([t.generator.model.single_model], t.task.target_dictionary, beam_size=1,
                              **t.spec.generation)
    encoded = encode(t, read(PAIRS[name][0], 40))
    reference = run(stock, t, encoded, 1)
    for batch in (1, 3, 16):
        assert run(t.generator, t, encoded, batch) == reference
    assert t.generator.stats.small_tokens > 0  # the small model did real work


#: out-of-domain input on which the shipped de-en big model loops ("Automatically automatically ...")
LOOPING = ["Automatisch automatisch automatisch wird die Tabelle automatisch aktualisiert automatisch.",
           "Die Katze sitzt auf der Matte und schaut aus dem Fenster, die Katze sitzt und schaut."]


def trigrams(tokens):
    return [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]


def test_exact_bild_with_no_repeat_ngram_size_equals_stock_on_shipped_pair():
    t = PairTranslator.from_pair_dir(ROOT / "data" / "pairs" / "deen", mode="bild", exact=True)
    encoded = encode(t, LOOPING + read(PAIRS["deen"][0], 30))
    big, tgt = t.generator.model.single_model, t.task.target_dictionary
    plain = run(SequenceGenerator([big], tgt, beam_size=1, **t.spec.generation), t, encoded, 16)
    stock = run(SequenceGenerator([big], tgt, beam_size=1, no_repeat_ngram_size=3, **t.spec.generation), t, encoded, 1)
    assert len(set(trigrams(plain[0]))) < len(trigrams(plain[0]))  # it loops without the option
    assert all(len(set(trigrams(h))) == len(trigrams(h)) for h in stock)  # the plugin's hook 6: stock bans
    assert stock[0] != plain[0]
    bild = BildSequenceGenerator([big], tgt, small_model=t.generator.small_model, exact=True, beam_size=1,
                                 no_repeat_ngram_size=3, **t.spec.generation)
    for batch in (1, 16):
        assert run(bild, t, encoded, batch) == stock
    assert bild.stats.small_tokens > 0
    greedy = BildSequenceGenerator([big], tgt, beam_size=1, no_repeat_ngram_size=3, **t.spec.generation)
    assert run(greedy, t, encoded, 16) == stock  # the big-only loop of bild-jobs run --big-only
    api = PairTranslator.from_pair_dir(t.spec.directory, exact=True, no_repeat_ngram_size=3)  # bild-jobs run's
    assert api.translate(LOOPING).hypotheses == [t.spec.text_pipeline().decode(tgt.string(h)) for h in stock[:2]]
