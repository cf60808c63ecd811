"""Multi-token cached decoding equals fairseq's own full (teacher-forced) decoder forward."""
import pytest
import torch

from bild_fairseq.incremental import EncoderOutput, IncrementalDecoder, UnsupportedDecoderError

TOL = 1e-4


def _load(pair, name):
    from fairseq import checkpoint_utils

    from bild_fairseq.api import PairTranslator

    t = PairTranslator.from_pair_dir(pair, mode="big")
    (model,), _ = checkpoint_utils.load_model_ensemble([str(pair / name)], task=t.task)
    return model.eval()


@pytest.fixture(scope="module", params=["big.pt", "small.pt"])
def model_and_batch(request, tiny_pair):
    model = _load(tiny_pair, request.param)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 200, (3, 9), generator=g)
    src[0, :3] = 1  # left padding, as fairseq batches sources
    prev = torch.randint(4, 200, (3, 11), generator=g)
    prev[:, 0] = 2
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=(src != 1).sum(1))
        full = model.get_normalized_probs(model.decoder(prev, encoder_out=enc), log_probs=True)
    return model, enc, prev, full


def test_k_tokens_at_once_equal_one_by_one_and_full_forward(model_and_batch):
    model, enc, prev, full = model_and_batch
    dec = IncrementalDecoder(model.decoder)
    rows = torch.arange(3)
    with torch.no_grad():
        cache = dec.start(EncoderOutput.of(enc), 32)
        at_once = dec.forward(cache, rows, prev, torch.full((3,), prev.size(1)))
        cache = dec.start(EncoderOutput.of(enc), 32)
        steps = [dec.forward(cache, rows, prev[:, t:t + 1], torch.ones(3, dtype=torch.long)) for t in range(prev.size(1))]
        cache = dec.start(EncoderOutput.of(enc), 32)  # mixed chunk sizes: 1, 4, 6
        chunks = [dec.forward(cache, rows, prev[:, a:b], torch.full((3,), b - a)) for a, b in ((0, 1), (1, 5), (5, 11))]
    assert (at_once - full).abs().max() < TOL
    assert (torch.cat(steps, 1) - full).abs().max() < TOL
    assert (torch.cat(chunks, 1) - full).abs().max() < TOL
    assert cache.length.tolist() == [11, 11, 11]


def test_truncate_then_refeed_equals_never_having_fed(model_and_batch):
    model, enc, prev, full = model_and_batch
    dec = IncrementalDecoder(model.decoder)
    rows = torch.arange(3)
    with torch.no_grad():
        cache = dec.start(EncoderOutput.of(enc), 32)
        dec.forward(cache, rows, prev[:, :6], torch.full((3,), 6))
        dec.forward(cache, rows, torch.randint(4, 200, (3, 4)), torch.full((3,), 4))  # rejected tokens
        cache.truncate(rows, torch.tensor([6, 3, 6]))
        # ragged refeed on a subset of rows, in a different order, right-padded
        tokens = torch.stack([prev[2, 6:11], prev[1, 3:8]])
        out = dec.forward(cache, torch.tensor([2, 1]), tokens, torch.tensor([5, 5]))
    assert (out[0] - full[2, 6:11]).abs().max() < TOL
    assert (out[1] - full[1, 3:8]).abs().max() < TOL
    assert cache.length.tolist() == [6, 8, 11]


def test_ragged_rows_with_padding_match(model_and_batch):
    model, enc, prev, full = model_and_batch
    dec = IncrementalDecoder(model.decoder)
    with torch.no_grad():
        cache = dec.start(EncoderOutput.of(enc), 32)
        out = dec.forward(cache, torch.arange(3), prev[:, :5], torch.tensor([5, 2, 3]))
    assert (out[0] - full[0, :5]).abs().max() < TOL
    assert (out[1, :2] - full[1, :2]).abs().max() < TOL
    assert (out[2, :3] - full[2, :3]).abs().max() < TOL
    assert cache.length.tolist() == [5, 2, 3]


def test_cache_grows_and_drops_finished_rows_without_changing_results(model_and_batch):
    model, enc, prev, full = model_and_batch
    dec = IncrementalDecoder(model.decoder)
    with torch.no_grad():
        cache = dec.start(EncoderOutput.of(enc), 2)  # grows by doubling as tokens arrive
        first = dec.forward(cache, torch.arange(3), prev[:, :3], torch.full((3,), 3))
        cache.select(torch.tensor([2, 0]))  # sentence 1 finished: it leaves the batch
        rest = dec.forward(cache, torch.arange(2), prev[[2, 0], 3:], torch.full((2,), 8))
    assert cache.capacity >= 11 and cache.length.tolist() == [11, 11]
    assert (first - full[:, :3]).abs().max() < TOL
    assert (rest - full[[2, 0], 3:]).abs().max() < TOL


def test_one_token_step_equals_forward_on_ragged_rows(model_and_batch):
    """The loop's fast path (every row feeds one token, rows at different lengths, cache
    growing from 2 slots, visible an upper bound) gives forward's results."""
    model, enc, prev, full = model_and_batch
    dec = IncrementalDecoder(model.decoder)
    with torch.no_grad():
        cache = dec.start(EncoderOutput.of(enc), 2)
        dec.forward(cache, torch.arange(3), prev[:, :5], torch.tensor([5, 2, 3]))  # lengths 5, 2, 3
        outs = []
        for _ in range(4):
            length = cache.length.clone()
            outs.append((length, dec.step(cache, prev[torch.arange(3), length], int(length.max()) + 3)))
    for length, out in outs:
        assert (out - full[torch.arange(3), length]).abs().max() < TOL
    assert cache.length.tolist() == [9, 6, 7]


def test_additive_masks_give_the_boolean_masks_results_bit_for_bit(model_and_batch, monkeypatch):
    """The float masks (the form CUDA's fused attention takes) are the same math as the boolean
    masks they replaced: a ragged k-token pass and one-token steps, equal bit for bit on CPU."""
    import bild_fairseq.incremental as incremental

    model, enc, prev, _ = model_and_batch

    def decode():
        dec = IncrementalDecoder(model.decoder)
        with torch.no_grad():
            cache = dec.start(EncoderOutput.of(enc), 2)
            first = dec.forward(cache, torch.arange(3), prev[:, :5], torch.tensor([5, 2, 3]))
            return [first] + [dec.step(cache, prev[torch.arange(3), cache.length], int(cache.length.max()) + 1)
                              for _ in range(3)]

    additive = decode()
    assert incremental.additive_mask(torch.tensor([True, False]), torch.float32).tolist() == [0.0, float("-inf")]
    monkeypatch.setattr(incremental, "additive_mask", lambda allowed, dtype: allowed)
    boolean = decode()
    assert all(torch.equal(a, b) for a, b in zip(additive, boolean))


def test_unsupported_decoder_is_refused_by_name(tiny_pair):
    model = _load(tiny_pair, "big.pt")
    model.decoder.cross_self_attention = True
    with pytest.raises(UnsupportedDecoderError, match="cross_self_attention"):
        IncrementalDecoder(model.decoder)
    with pytest.raises(UnsupportedDecoderError, match="TransformerDecoder"):
        IncrementalDecoder(torch.nn.Linear(2, 2))
