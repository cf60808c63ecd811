"""BiLD decoding on tiny random pairs: exact == big greedy, lossy edge cases, batching, statistics."""
import lzma

import pytest
import torch
from fairseq.data import data_utils
from fairseq.sequence_generator import SequenceGenerator

from bild_fairseq.api import PairTranslator
from bild_fairseq.config import BildOptionError
from bild_fairseq.generator import BildSequenceGenerator
from tiny import DECODERS, ROOT, TINY_SMALL, make_tiny_pair, random_model

MAX_LEN_B = 40


def raw_lines(name, n):
    with lzma.open(ROOT / "data" / "corpora" / name, "rt", encoding="utf-8") as f:
        return [next(f).strip() for _ in range(n)]


def encode(t: PairTranslator, lines):
    pipe = t.spec.text_pipeline()
    out = []
    for line in lines:
        ids = t.task.source_dictionary.encode_line(pipe.encode(line), add_if_not_exist=False).long()
        out.append(ids[-t.max_source_tokens:])
    return out


def decode_all(generator, sources, batch_size):
    d_pad, d_eos = 1, 2
    hyps = []
    for i in range(0, len(sources), batch_size):
        chunk = sources[i:i + batch_size]
        sample = {"net_input": {"src_tokens": data_utils.collate_tokens(chunk, d_pad, d_eos, left_pad=True),
                                "src_lengths": torch.tensor([s.numel() for s in chunk])}}
        with torch.no_grad():
            hyps += [h[0]["tokens"].tolist() for h in generator.generate(generator.model.models, sample)]
    return hyps


def bild(t_big, small, **kw):
    return BildSequenceGenerator([t_big.generator.model.single_model], t_big.task.target_dictionary,
                                 small_model=small, beam_size=1, max_len_b=MAX_LEN_B, **kw)


def stock_greedy(model, tgt_dict):
    return SequenceGenerator([model], tgt_dict, beam_size=1, max_len_b=MAX_LEN_B)


@pytest.fixture(scope="module")
def pairs(deen_slice, summ_slice, tmp_path_factory):
    """Three random de-en pairs and one summarization pair (long sources)."""
    out = []
    for seed in (0, 1, 2):
        d = make_tiny_pair(deen_slice, tmp_path_factory.mktemp(f"pair{seed}"), seed=seed)
        out.append((d, raw_lines("lohelp.de-en.test.de.xz", 14)))
    d = make_tiny_pair(summ_slice, tmp_path_factory.mktemp("summ"), task="summarization", seed=7,
                       max_source_tokens=80)
    out.append((d, raw_lines("debdesc.test.src.xz", 14)))
    return out


def load(pair_dir):
    big = PairTranslator.from_pair_dir(pair_dir, mode="big")
    small = PairTranslator.from_pair_dir(pair_dir, mode="small").generator.model.single_model
    return big, small


SETTINGS = [dict(fallback_threshold=0.0, max_small_steps=3), dict(fallback_threshold=0.0, max_small_steps=10),
            dict(fallback_threshold=0.6, max_small_steps=10), dict(fallback_threshold=0.05, max_small_steps=5)]
#: batch policies: per-sentence (default), waiting for a share of the batch or a time-out, all waiting
#: with the drafting sentences checked along
POLICIES = [dict(), dict(wait_share=0.5, max_wait=3), dict(wait_share=1.0, verify_drafting=True),
            dict(wait_share=0.3, max_wait=2, verify_drafting=True)]


@pytest.mark.parametrize("pair_index", [0, 1, 2, 3])
def test_exact_mode_equals_stock_fairseq_greedy(pairs, pair_index):
    pair_dir, lines = pairs[pair_index]
    big, small = load(pair_dir)
    sources = encode(big, lines)
    reference = decode_all(stock_greedy(big.generator.model.single_model, big.task.target_dictionary), sources, 1)
    # two settings per pair (each setting on two pairs), every batching; every policy on one setting
    mine = [SETTINGS[pair_index], SETTINGS[(pair_index + 1) % len(SETTINGS)]]
    runs = [(settings, POLICIES[0], batch_size) for settings in mine for batch_size in (1, 3, 16)]
    runs += [(mine[0], policy, 16) for policy in POLICIES[1:]]
    for settings, policy, batch_size in runs:
        gen = bild(big, small, exact=True, rollback_threshold=5.0, **settings, **policy)
        assert decode_all(gen, sources, batch_size) == reference, (settings, policy, batch_size)
        assert gen.stats.small_tokens > 0 or settings["fallback_threshold"] > 0


def test_lossy_edge_thresholds_reduce_to_one_model(pairs):
    pair_dir, lines = pairs[0]
    big, small = load(pair_dir)
    sources = encode(big, lines)
    tgt = big.task.target_dictionary
    small_only = decode_all(stock_greedy(small, tgt), sources, 1)
    big_only = decode_all(stock_greedy(big.generator.model.single_model, tgt), sources, 1)
    never_fall_back = bild(big, small, fallback_threshold=0.0, rollback_threshold=1e9, max_small_steps=10_000)
    assert decode_all(never_fall_back, sources, 4) == small_only
    assert never_fall_back.stats.rollbacks == 0
    always_fall_back = bild(big, small, fallback_threshold=1.0, rollback_threshold=5.0)
    assert decode_all(always_fall_back, sources, 4) == big_only
    assert always_fall_back.stats.small_tokens == 0
    every_rollback = bild(big, small, fallback_threshold=0.0, rollback_threshold=0.0, max_small_steps=4)
    assert decode_all(every_rollback, sources, 4) == big_only


@pytest.mark.parametrize("settings", [dict(fallback_threshold=0.0, rollback_threshold=2.0, max_small_steps=4),
                                      dict(fallback_threshold=0.0, rollback_threshold=4.0, max_small_steps=10)])
def test_lossy_output_does_not_depend_on_batch_or_batch_policy(pairs, settings):
    """Each sentence alone, and inside batches of different sizes and orders, under every batch
    policy: the same output (the policy only decides when the big model runs)."""
    pair_dir, lines = pairs[3]
    big, small = load(pair_dir)
    sources = encode(big, lines)
    alone = decode_all(bild(big, small, **settings), sources, 1)
    assert decode_all(bild(big, small, **settings), sources, 3) == alone
    for i, policy in enumerate(POLICIES):  # in order in batches of 16, or reversed in batches of 7
        gen = bild(big, small, **settings, **policy)
        order = slice(None, None, -1 if i % 2 else 1)
        assert decode_all(gen, sources[order], 7 if i % 2 else 16) == alone[order], policy


def test_statistics_add_up(pairs):
    pair_dir, lines = pairs[1]
    big, small = load(pair_dir)
    sources = encode(big, lines)
    gen = bild(big, small, fallback_threshold=0.0, rollback_threshold=3.0, max_small_steps=4)
    hyps = decode_all(gen, sources, 5)
    st = gen.stats
    assert st.sentences == len(lines)
    assert st.tokens == sum(len(h) for h in hyps) == st.small_tokens + st.big_tokens
    assert st.rollbacks > 0 and st.small_tokens > 0 and st.big_tokens > 0
    # every big pass appends exactly one big token, except a pass that verifies a small EOS
    assert st.big_tokens <= st.big_calls <= st.big_tokens + st.eos_checks
    assert st.big_passes <= st.big_calls and st.early_checks == 0  # per-sentence policy: no early checks
    # with fallback threshold 0, only max-small-steps makes the small model hand over
    assert st.fallbacks <= st.small_steps // 4 + len(lines)
    d = st.to_dict()
    assert d["big_token_share"] == pytest.approx(st.big_tokens / st.tokens)
    assert d["tokens_per_big_call"] == pytest.approx(st.tokens / st.big_calls)
    assert d["big_passes_per_token"] == pytest.approx(st.big_passes / st.tokens)


def test_waiting_batches_the_big_model_calls(pairs):
    """Waiting for the whole batch calls the big model less often, for more sentences per call;
    checking the drafting sentences along adds verifications that append nothing unless rejected."""
    pair_dir, lines = pairs[1]
    big, small = load(pair_dir)
    sources = encode(big, lines)
    settings = dict(fallback_threshold=0.0, rollback_threshold=7.5, max_small_steps=4)  # ~log(vocab)
    eager, waiting, along = (bild(big, small, **settings, **policy) for policy in
                             (dict(), dict(wait_share=1.0), dict(wait_share=0.5, verify_drafting=True)))
    outputs = [decode_all(g, sources, 10) for g in (eager, waiting, along)]
    assert outputs[0] == outputs[1] == outputs[2]
    assert waiting.stats.big_passes < eager.stats.big_passes
    assert waiting.stats.big_calls == eager.stats.big_calls and waiting.stats.early_checks == 0
    assert along.stats.early_checks > 0
    assert along.stats.big_tokens <= along.stats.big_calls <= (along.stats.big_tokens + along.stats.eos_checks
                                                               + along.stats.early_checks)
    for g in (eager, waiting, along):
        assert g.stats.tokens == eager.stats.tokens and g.stats.big_tokens == eager.stats.big_tokens


def test_hypothesis_scores_are_the_big_models(pairs):
    pair_dir, lines = pairs[0]
    big, small = load(pair_dir)
    sources = encode(big, lines[:4])
    gen = bild(big, small, fallback_threshold=0.0, rollback_threshold=3.0, max_small_steps=4)
    model = big.generator.model.single_model
    sample = {"net_input": {"src_tokens": data_utils.collate_tokens(sources, 1, 2, left_pad=True),
                            "src_lengths": torch.tensor([s.numel() for s in sources])}}
    with torch.no_grad():
        hypos = gen.generate([model], sample)
        for b, (h,) in enumerate(hypos):
            prev = torch.cat([torch.tensor([2]), h["tokens"][:-1]]).unsqueeze(0)
            enc = model.encoder(sources[b].unsqueeze(0), src_lengths=torch.tensor([sources[b].numel()]))
            lp = model.get_normalized_probs(model.decoder(prev, encoder_out=enc), log_probs=True)[0]
            expected = lp.gather(1, h["tokens"].unsqueeze(1)).squeeze(1)
            assert torch.allclose(h["positional_scores"], expected, atol=1e-4)
            assert h["score"] == pytest.approx(float(expected.sum() / len(expected)), abs=1e-4)


def test_unsupported_options_are_refused_early(pairs):
    pair_dir, _ = pairs[0]
    big, small = load(pair_dir)
    model, tgt = big.generator.model.single_model, big.task.target_dictionary
    with pytest.raises(BildOptionError, match="--beam 1"):
        BildSequenceGenerator([model], tgt, small_model=small, beam_size=4)
    with pytest.raises(BildOptionError, match=r"\[0, 1\]"):
        BildSequenceGenerator([model], tgt, small_model=small, fallback_threshold=1.5)
    with pytest.raises(BildOptionError, match=">= 0"):
        BildSequenceGenerator([model], tgt, small_model=small, rollback_threshold=-1)
    with pytest.raises(BildOptionError, match="wait-share"):
        BildSequenceGenerator([model], tgt, small_model=small, wait_share=1.5)
    with pytest.raises(BildOptionError, match="max-wait"):
        BildSequenceGenerator([model], tgt, small_model=small, max_wait=0)
    with pytest.raises(BildOptionError, match="ensemble"):
        BildSequenceGenerator([model, model], tgt, small_model=small)


def test_project_greedy_loop_equals_stock_at_any_batching(pairs):
    """Without a small model every iteration takes the one-token fast path of the big model."""
    pair_dir, lines = pairs[3]
    big, _ = load(pair_dir)
    sources = encode(big, lines)
    model, tgt = big.generator.model.single_model, big.task.target_dictionary
    reference = decode_all(stock_greedy(model, tgt), sources, 1)
    for batch_size in (1, 3, 16):
        loop = BildSequenceGenerator([model], tgt, beam_size=1, max_len_b=MAX_LEN_B)
        assert decode_all(loop, sources, batch_size) == reference, batch_size


def test_search_rules_on_a_hand_made_distribution():
    from bild_fairseq.rules import SearchRules

    rules = SearchRules(6, pad=1, unk=3, eos=2, unk_penalty=0.5, suppress=torch.tensor([5]), min_len=2)
    lprobs = torch.log_softmax(torch.randn(4, 6), -1)
    lprobs[0, 4] = float("nan")
    step, max_len = torch.tensor([0, 2, 5, 5]), torch.tensor([5, 5, 5, 9])
    out = rules.apply(lprobs, step, max_len)
    assert out[:, 1].eq(-float("inf")).all() and out[:, 5].eq(-float("inf")).all()  # pad, suppressed
    assert out[0, 4] == -float("inf")  # NaN never chosen
    assert torch.allclose(out[[1, 3], 3], lprobs[[1, 3], 3] - 0.5)  # unk penalty
    assert out[0, 2] == -float("inf") and out[1, 2] == lprobs[1, 2]  # no EOS before min_len
    assert out[2].argmax() == 2 and out[2].isfinite().sum() == 1 and out[2, 2] == lprobs[2, 2]  # forced EOS
    assert torch.equal(out[3, [0, 2, 4]], lprobs[3, [0, 2, 4]])  # untouched otherwise


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_exact_mode_equals_stock_with_min_len_and_unk_penalty(deen_slice, tiny_pair, decoder):
    """--min-len and --unkpen through the whole generator, for every decoder form the plugin
    supports: exact BiLD writes what fairseq's own SequenceGenerator writes with the same options,
    and the options really change the output."""
    t = PairTranslator.from_pair_dir(tiny_pair, mode="big")
    sources, tgt = encode(t, raw_lines("lohelp.de-en.test.de.xz", 12)), t.task.target_dictionary
    big = random_model(deen_slice / "bin", DECODERS[decoder], seed=3)[0]  # a seed whose outputs end early
    small = random_model(deen_slice / "bin", TINY_SMALL, seed=22)[0]
    options = dict(beam_size=1, max_len_b=MAX_LEN_B, min_len=12, unk_penalty=-15.0)  # a bonus: <unk> gets written
    stock = decode_all(SequenceGenerator([big], tgt, **options), sources, 1)
    exact = BildSequenceGenerator([big], tgt, small_model=small, exact=True, rollback_threshold=2.0, **options)
    assert decode_all(exact, sources, 5) == stock
    plain = decode_all(SequenceGenerator([big], tgt, beam_size=1, max_len_b=MAX_LEN_B), sources, 1)
    assert min(len(h) for h in stock) > 12 and min(len(h) for h in plain) <= 12  # min-len in effect
    assert sum(h.count(tgt.unk()) for h in stock) > sum(h.count(tgt.unk()) for h in plain)  # unkpen in effect


class _DeviceStrictTorch:
    """torch, except that its tensor factories must be told the device: what decodes on a GPU
    cannot make a tensor on the CPU by default (issue 28), checked without a GPU."""

    FACTORIES = ("tensor", "zeros", "ones", "full", "arange", "empty")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name not in self.FACTORIES:
            return value

        def factory(*args, **kwargs):
            assert "device" in kwargs, f"torch.{name} without a device in the decoding loop"
            return value(*args, **kwargs)
        return factory


def test_the_decoding_loop_makes_its_tensors_on_the_models_device(tiny_pair, monkeypatch):
    """The one-sentence BiLD loop, the batched one and the greedy loop name the device of every
    tensor they make (they once made CPU tensors at batch 1, which a CUDA model refuses)."""
    import bild_fairseq.generator as generator

    big, small = load(tiny_pair)
    sources = encode(big, raw_lines("lohelp.de-en.test.de.xz", 3))
    loops = [bild(big, small, exact=True), bild(big, small, fallback_threshold=0.05), big.generator]
    want = [decode_all(g, sources, b) for g in loops for b in (1, 3)]
    monkeypatch.setattr(generator, "torch", _DeviceStrictTorch())
    assert [decode_all(g, sources, b) for g in loops for b in (1, 3)] == want
