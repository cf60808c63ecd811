"""Where BiLD's time goes on this machine, for BENCHMARKS.md's analysis.

    OMP_NUM_THREADS=1 python benchmarks/costs.py data/pairs/deen data/corpora/lohelp.de-en.test.de.xz --limit 100

1. The cost of one decoder pass of each model over k new tokens (batch 1, after a 20-token
   prefix): BiLD bets that the big model verifying k tokens in one pass costs about one pass.
2. Each variant's decoding time at batch 1 split into model forward passes and the loop's own
   bookkeeping, by timing the generator's step methods (a diagnostic: the wrappers add a few
   microseconds per call).
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from bild_fairseq import generator, incremental
from jobs.measure import Batching, PairModels, Variant, encode, generate, plan_batches, read_lines, stats_of

KS = (1, 2, 4, 8, 11)
STEPS = {"_small_step": "small step", "_big_step": "big step", "forward": "decoder forward", "start": "cache start"}


def pass_costs(models: PairModels, source: torch.Tensor, repeats: int = 200) -> dict[str, dict[int, float]]:
    """Milliseconds per decoder pass over k new tokens, per model."""
    net = {"src_tokens": source[None], "src_lengths": torch.tensor([source.numel()])}
    out = {}
    for name, model in (("big", models.big), ("small", models.small[None])):
        decoder = incremental.IncrementalDecoder(model.decoder)
        encoded = model.encoder.forward_torchscript(net)
        rows, out[name] = torch.tensor([0]), {}
        with torch.no_grad():
            cache = decoder.start(encoded, 64)
            decoder.forward(cache, rows, torch.full((1, 20), 5), torch.tensor([20]))
            for k in KS:
                tokens, counts = torch.full((1, k), 5), torch.tensor([k])
                t0 = time.perf_counter()
                for _ in range(repeats):
                    decoder.forward(cache, rows, tokens, counts)
                    cache.length[0] = 20
                out[name][k] = (time.perf_counter() - t0) / repeats * 1e3
    return out


class StepTimer:
    """Wraps the generator's step methods with timers (seconds and calls per method)."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self._originals = []

    def __enter__(self) -> "StepTimer":
        for owner, name in ((generator.BildSequenceGenerator, "_small_step"),
                            (generator.BildSequenceGenerator, "_big_step"),
                            (incremental.IncrementalDecoder, "forward"), (incremental.IncrementalDecoder, "start")):
            original = getattr(owner, name)
            self._originals.append((owner, name, original))
            setattr(owner, name, self._timed(name, original))
        return self

    def _timed(self, name, original):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1
        return timed

    def __exit__(self, *exc) -> None:
        for owner, name, original in self._originals:
            setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pair")
    parser.add_argument("source")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    variants = [Variant("big", "big"), Variant("small", "small"), Variant("bild-exact", "bild", exact=True),
                Variant("bild-default", "bild")]
    models = PairModels(args.pair, variants)
    sources = encode(models.base, read_lines(args.source, args.limit))

    costs = pass_costs(models, max(sources, key=lambda s: s.numel()))
    print("| model | " + " | ".join(f"k={k}" for k in KS) + " |\n|---|" + "---|" * len(KS))
    for name, row in costs.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f} ms" for k in KS) + " |")

    print("\n| variant | ms/token | tokens/big call | "
          + " | ".join(f"{label}: ms/call (calls/token)" for label in STEPS.values()) + " |")
    print("|---|---|---|" + "---|" * len(STEPS))
    batches = [[sources[i] for i in batch] for batch in plan_batches(sources, Batching(1, 10**6))]
    for v in variants:
        translator = models.translator(v)
        generate(translator, batches[0])  # warm
        before = stats_of(translator)
        with StepTimer() as timer:
            seconds, tokens = 0.0, 0
            for batch in batches:
                elapsed, outputs = generate(translator, batch)
                seconds, tokens = seconds + elapsed, tokens + sum(o.numel() for o in outputs)
        big_calls = stats_of(translator).big_calls - before.big_calls
        cells = [f"{1e3 * timer.seconds[m] / timer.calls[m]:.3f} ({timer.calls[m] / tokens:.2f})" if timer.calls[m]
                 else "—" for m in STEPS]
        print(f"| {v.name} | {1e3 * seconds / tokens:.3f} | {tokens / big_calls:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
