"""The ONNX Runtime engine against the torch engine (the reference) on tiny random models:
export round trip, cache mechanics, row independence, exact mode == the engine's own greedy."""
import copy
import logging
import math
import sys

import pytest
import torch

from bild_fairseq.api import PairTranslator
from bild_fairseq.engines import build_engine, onnx_export
from bild_fairseq.engines.ort_engine import OrtEngine
from bild_fairseq.engines.torch_engine import TorchEngine
from bild_fairseq.generator import BildSequenceGenerator
from bild_fairseq.rules import SearchRules
from bild_fairseq.sharing import same_encoder
from jobs.tuning.ties import NOISE, first_divergence_gaps
from test_generator import decode_all, encode, raw_lines
from tiny import DECODERS, random_checkpoint, random_model, with_project_in

POST_NORM = "post-norm, tied, learned positions"
PROJECT_IN = "narrow embeddings, project in"


@pytest.fixture(scope="module")
def models(deen_slice, tiny_pair, tmp_path_factory):
    """One loaded model per decoder variant, and a translator whose task loads them."""
    base = PairTranslator.from_pair_dir(tiny_pair, mode="big")
    out = {}
    for i, (name, args) in enumerate(DECODERS.items()):
        path = random_checkpoint(deen_slice / "bin", args, tmp_path_factory.mktemp("variant") / "m.pt", seed=10 + i)
        t = PairTranslator.from_pair_dir(tiny_pair, mode="big", big_checkpoint=path)
        out[name] = t.generator.model.single_model
    out[PROJECT_IN] = with_project_in(random_model(deen_slice / "bin", DECODERS[POST_NORM], seed=13)[0])
    return base, out


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 200, (3, 9), generator=g)
    src[0, :3] = 1  # left padding, as fairseq batches sources
    prev = torch.randint(4, 200, (3, 11), generator=g)
    prev[:, 0] = 2
    return src, (src != 1).sum(1), prev


def _rules(model) -> SearchRules:
    d = model.decoder.dictionary
    return SearchRules(len(d), d.pad(), d.unk(), d.eos())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within float noise; banned tokens (-inf) in the same places."""
    return torch.allclose(a, b, rtol=0, atol=1e-4)


def _teacher_forced(model, src, lengths, prev, rules):
    """fairseq's own full decoder forward, with the search rules at each position."""
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        full = model.get_normalized_probs(model.decoder(prev, encoder_out=enc), log_probs=True)
    steps = torch.arange(prev.size(1)).expand(prev.size(0), -1)
    return rules.apply(full, steps, torch.full((prev.size(0), 1), 1000))


@pytest.mark.parametrize("decoder", [*DECODERS, PROJECT_IN])
def test_exported_graphs_equal_the_torch_engine(models, decoder):
    """k tokens at once, ragged rows, a truncation and refeed on a subset of rows, one-token
    steps and finished rows leaving: the ONNX Runtime engine gives fairseq's own distributions."""
    _, variants = models
    model = variants[decoder]
    rules, src, lengths, prev = _rules(model), *_batch()
    full = _teacher_forced(model, src, lengths, prev, rules)
    big = torch.full((3,), 1000)
    for engine in (TorchEngine(model), OrtEngine(model)):
        assert not model.training  # exporting left the model as it was (dropout off)
        with torch.no_grad():
            cache = engine.start(engine.encode(src, lengths), capacity=2)  # grows as tokens arrive
            first = engine.forward(cache, torch.arange(3), prev[:, :6], torch.tensor([6, 2, 6]), 6, True, rules, big)
            engine.forward(cache, torch.arange(3), torch.randint(4, 200, (3, 3)), torch.full((3,), 3), 9, True,
                           rules, big)  # rejected tokens
            cache.truncate(torch.arange(3), torch.tensor([6, 2, 5]))
            refeed = engine.forward(cache, torch.tensor([2, 1]), torch.stack([prev[2, 5:10], prev[1, 2:7]]),
                                    torch.tensor([5, 5]), 10, False, rules, big[:2])
            cache.select(torch.tensor([2, 0]))  # sentence 1 finished: it leaves the batch
            step = engine.step(cache, torch.stack([prev[2, 10], prev[0, 6]]), 12, rules, big[:2])
        name = f"{decoder} on {engine.name}"
        assert _close(first.lprobs[0], full[0, :6]), name
        assert _close(first.lprobs[1, :2], full[1, :2]), name
        assert _close(refeed.lprobs[0], full[2, 5:10]), name
        assert _close(refeed.lprobs[1], full[1, 2:7]), name
        assert _close(step.lprobs[0], full[2, 10]), name
        assert _close(step.lprobs[1], full[0, 6]), name
        assert torch.equal(first.best, first.lprobs.max(-1).indices), name
        assert torch.equal(step.best_lp, step.lprobs.max(-1).values), name
        assert cache.length.tolist() == [11, 7], name


def test_rows_do_not_depend_on_their_batch_mates(models):
    """A row's distributions are bit-identical alone and among other rows, fp32 and 8-bit alike
    (what makes exact mode's one-token steps and k-token passes agree on this engine). The
    source padding is the batch's: a different padding is a different input."""
    _, variants = models
    model = variants[POST_NORM]
    rules, src, lengths, prev = _rules(model), *_batch(1)
    big = torch.full((3,), 1000)
    for int8 in (False, True):
        engine = OrtEngine(model, int8=int8)
        cache = engine.start(engine.encode(src, lengths))
        together = engine.forward(cache, torch.arange(3), prev[:, :5], torch.full((3,), 5), 5, True, rules, big)
        step_together = engine.step(cache, prev[:, 5], 6, rules, big)
        for r in range(3):
            cache = engine.start(engine.encode(src[r:r + 1], lengths[r:r + 1]))  # alone, with the padding its batch gave it
            alone = engine.forward(cache, torch.arange(1), prev[r:r + 1, :5], torch.tensor([5]), 5, True, rules, big[:1])
            # the same tokens fed as a 2-token then a 3-token pass
            assert torch.equal(alone.lprobs[0], together.lprobs[r]), (int8, r)
            assert torch.equal(engine.step(cache, prev[r:r + 1, 5], 6, rules, big[:1]).lprobs[0],
                               step_together.lprobs[r]), (int8, r)


@pytest.mark.parametrize("int8", [False, True])
def test_a_token_scores_the_same_in_a_step_and_in_any_pass(models, int8):
    """What exact mode rests on: a token's distribution is bit-identical whether the token is
    fed in a one-token step or inside k-token passes of any split, with 1, 2 or 3 rows."""
    _, variants = models
    model = variants["pre-norm, untied, sinusoidal positions"]
    rules, (src, lengths, prev) = _rules(model), _batch(3)
    engine = OrtEngine(model, int8=int8)
    for rows in (1, 2, 3):
        s, n, p, big = src[:rows], lengths[:rows], prev[:rows, :9], torch.full((rows,), 1000)
        cache = engine.start(engine.encode(s, n))
        steps = torch.stack([engine.step(cache, p[:, j], j + 1, rules, big).lprobs for j in range(9)], 1)
        for split in ((9,), (4, 5), (1, 3, 5), (2, 2, 2, 3)):
            cache, at, passes = engine.start(engine.encode(s, n)), 0, []
            for k in split:
                passes.append(engine.forward(cache, torch.arange(rows), p[:, at:at + k], torch.full((rows,), k),
                                             at + k, True, rules, big).lprobs)
                at += k
            assert torch.equal(torch.cat(passes, 1), steps), (int8, rows, split)


def test_int8_weights_stay_close_to_fp32(models):
    _, variants = models
    model = variants[POST_NORM]
    rules, src, lengths, prev = _rules(model), *_batch(2)
    big = torch.full((3,), 1000)
    out = {}
    for int8 in (False, True):
        engine = OrtEngine(model, int8=int8)
        out[int8] = engine.forward(engine.start(engine.encode(src, lengths)), torch.arange(3), prev, torch.full((3,), 11), 11, True,
                                   rules, big).lprobs
    probs = [o.exp() for o in out.values()]  # exp(-inf) = 0 for the banned tokens
    assert (probs[0] - probs[1]).abs().max() < 0.05  # 8-bit weights move probabilities a little
    assert not torch.equal(out[False], out[True])  # ... and are really in use


def test_graph_cache_is_keyed_by_the_weights(models, tmp_path, caplog):
    _, variants = models
    model = variants["layernorm_embedding, unscaled, project out"]
    with caplog.at_level(logging.INFO, logger="bild_fairseq"):
        folder, seconds = onnx_export.graphs(model, False, tmp_path)
    assert seconds is not None and "exported TransformerModel to ONNX (fp32)" in caplog.text
    assert onnx_export.graphs(model, False, tmp_path) == (folder, None)  # cached: no export
    assert onnx_export.graphs(model, True, tmp_path)[0] != folder  # another precision, other graphs
    with torch.no_grad():
        model.decoder.layers[0].fc1.weight[0, 0] += 1.0
    try:
        changed, seconds = onnx_export.graphs(model, False, tmp_path)
        assert changed != folder and seconds is not None  # the checkpoint changed: exported again
    finally:
        with torch.no_grad():
            model.decoder.layers[0].fc1.weight[0, 0] -= 1.0


def test_without_onnxruntime_the_torch_engine_runs_and_says_so(models, monkeypatch, caplog):
    from bild_fairseq import engines

    _, variants = models
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    engines.onnxruntime_available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="bild_fairseq"):
            engine = build_engine(variants[POST_NORM], "onnxruntime", int8=True)
        assert isinstance(engine, TorchEngine)
        assert "onnxruntime is not installed: decoding with the torch engine" in caplog.text
    finally:
        engines.onnxruntime_available.cache_clear()


def test_int8_without_the_onnxruntime_engine_is_refused(models):
    from bild_fairseq.config import BildOptionError

    _, variants = models
    with pytest.raises(BildOptionError, match="--bild-int8 needs --bild-engine onnxruntime"):
        build_engine(variants[POST_NORM], "torch", int8=True)


@pytest.fixture(scope="module")
def pair_models(tiny_pair):
    big = PairTranslator.from_pair_dir(tiny_pair, mode="big")
    small = PairTranslator.from_pair_dir(tiny_pair, mode="small").generator.model.single_model
    return big, small, encode(big, raw_lines("lohelp.de-en.test.de.xz", 24))


@pytest.mark.parametrize("int8", [False, True])
def test_exact_mode_equals_the_engines_own_greedy_at_any_batching(pair_models, int8):
    big, small, sources = pair_models
    model, tgt = big.generator.model.single_model, big.task.target_dictionary
    runtime = {"engine": "onnxruntime", "int8": int8, "beam_size": 1, "max_len_b": 40}
    greedy = decode_all(BildSequenceGenerator([model], tgt, **runtime), sources, 1)
    assert decode_all(BildSequenceGenerator([model], tgt, **runtime), sources, 7) == greedy  # rows independent
    for batch_size, policy in ((1, {}), (7, {}), (16, {"wait_share": 0.5, "verify_drafting": True})):
        gen = BildSequenceGenerator([model], tgt, small_model=small, exact=True, fallback_threshold=0.0,
                                    max_small_steps=5, **policy, **runtime)
        assert decode_all(gen, sources, batch_size) == greedy, (batch_size, policy)
        assert gen.stats.small_tokens > 0 and gen.stats.rollbacks > 0
    lossy = [decode_all(BildSequenceGenerator([model], tgt, small_model=small, fallback_threshold=0.0, max_small_steps=4,
                                              rollback_threshold=2.0, **runtime), sources[::step], size)[::step]
             for step, size in ((1, 1), (-1, 7))]
    assert lossy[0] == lossy[1]  # lossy output does not depend on batch-mates either


def test_onnxruntime_greedy_equals_stock_fairseq_except_near_ties(pair_models):
    """fp32 graphs vs fairseq's own greedy search: identical, or the first difference is a
    near tie (the two best log-probabilities within float noise)."""
    from test_generator import stock_greedy

    big, _, sources = pair_models
    model, tgt = big.generator.model.single_model, big.task.target_dictionary
    ours = decode_all(BildSequenceGenerator([model], tgt, engine="onnxruntime", beam_size=1, max_len_b=40), sources, 4)
    stock = decode_all(stock_greedy(model, tgt), sources, 1)
    gaps = first_divergence_gaps(model, sources, [torch.tensor(x) for x in ours], [torch.tensor(x) for x in stock],
                                 tgt.eos())
    assert all(gap < NOISE for gap in gaps), gaps
    assert sum(a == b for a, b in zip(ours, stock)) >= len(stock) - 2


def test_the_api_decodes_on_the_engine_it_records(tiny_pair):
    """PairTranslator (what the runner's workers use) passes the engine through and records it."""
    from bild_fairseq.config import BildOptionError

    lines = raw_lines("lohelp.de-en.test.de.xz", 6)
    reference = PairTranslator.from_pair_dir(tiny_pair, mode="big")
    assert (reference.settings["engine"], reference.settings["precision"]) == ("torch", "fp32")
    want = reference.translate(lines).hypotheses
    for int8 in (False, True):
        ort = PairTranslator.from_pair_dir(tiny_pair, mode="bild", engine="onnxruntime", int8=int8, exact=True)
        assert (ort.settings["engine"], ort.settings["precision"]) == ("onnxruntime", "int8" if int8 else "fp32")
        assert isinstance(ort.generator.big, OrtEngine) and isinstance(ort.generator.small, OrtEngine)
        got = ort.translate(lines)
        assert len(got.hypotheses) == len(lines) and got.stats["tokens"] > 0
        if not int8:  # fp32: torch's output but for near ties (8-bit weights move a random model further)
            assert sum(a == b for a, b in zip(got.hypotheses, want)) >= len(lines) - 1
    with pytest.raises(BildOptionError, match="decodes greedily with fp32 models"):
        PairTranslator.from_pair_dir(tiny_pair, mode="big", engine="onnxruntime", precision="bf16")


@pytest.mark.parametrize("engine, int8", [("torch", False), ("onnxruntime", False), ("onnxruntime", True)])
def test_a_small_model_sharing_the_big_encoder_decodes_from_its_output(pair_models, engine, int8):
    """A small model whose encoder is the big model's (bild-jobs distill --share-encoder) is
    recognised by its weights; its encoder then never runs, its decoder reads the big encoder's
    output, and nothing changes but the cost: exact mode is the big model's greedy, lossy mode
    gives what the small model's own encoder copy gives."""
    big, small, sources = pair_models
    model, tgt = big.generator.model.single_model, big.task.target_dictionary
    shared = copy.deepcopy(small)
    shared.encoder = copy.deepcopy(model.encoder)  # the tiny pair's encoders are equally wide
    assert same_encoder(model, shared) and not same_encoder(model, small)
    runtime = {"engine": engine, "int8": int8, "beam_size": 1, "max_len_b": 40}
    greedy = decode_all(BildSequenceGenerator([model], tgt, **runtime), sources, 1)
    lossy = {"fallback_threshold": 0.0, "max_small_steps": 4, "rollback_threshold": 2.0}
    for exact, settings in ((True, {"fallback_threshold": 0.0, "max_small_steps": 5}), (False, lossy)):
        gen = BildSequenceGenerator([model], tgt, small_model=shared, exact=exact, **settings, **runtime)
        assert gen.shared_encoder
        gen.small.encode = None  # never called: the small decoder starts from the big encoder's output
        outputs = [decode_all(gen, sources, size) for size in (1, 7)]
        assert gen.stats.small_tokens > 0
        if exact:
            assert outputs == [greedy, greedy]
        else:
            own = BildSequenceGenerator([model], tgt, small_model=shared, exact=exact, **settings, **runtime)
            own.shared_encoder = False  # the small model's own copy of the encoder runs
            assert [decode_all(own, sources, size) for size in (1, 7)] == outputs
    with torch.no_grad():
        next(shared.encoder.parameters()).view(-1)[0] += 1e-3
    assert not same_encoder(model, shared)  # one weight differs: its own encoder runs
