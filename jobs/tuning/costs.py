"""Where BiLD's time goes on this machine, for BENCHMARKS.md's analysis.

    OMP_NUM_THREADS=1 python -m jobs.tuning.costs data/pairs/deen data/corpora/lohelp.de-en.test.de.xz --limit 100

1. The cost of one decoder pass of each model over k new tokens (for each of ``--rows``
   sentences, after a 20-token prefix): BiLD bets that the big model verifying k tokens in one
   pass costs about one pass, and batched BiLD that a pass over many rows costs about one pass.
   ``step`` is the specialised one-token pass the loop uses where it can.
2. Each variant's decoding time (at ``--batch``, default 1) split into model passes and the loop's own
   bookkeeping, by timing the generator's step methods (a diagnostic: the wrappers add a few
   microseconds per call), and the host reads per loop iteration: every call that turns a
   tensor into a Python value (``item``, ``tolist``, ``bool``/``int``/``float``, ``nonzero``),
   each of which stalls a GPU's launch queue. Runs on older checkouts too (it looks the step
   methods up by name), which is how BENCHMARKS.md compares the old and the new engine.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from bild_fairseq import generator, incremental
from jobs.shards import read_lines
from jobs.tuning.measure import Batching, PairModels, Variant, encode, generate, plan_batches, stats_of

KS = (1, 2, 4, 8, 11)
#: timed methods (old engine's names, then the new one's) -> column label
STEPS = {("_small_step", "_propose"): "small step", ("_big_step", "_verify"): "big step",
         ("forward",): "decoder forward", ("step",): "decoder step", ("start",): "cache start"}
#: columns: decoder calls are split by model
COLUMNS = ("small step", "small decoder forward", "small decoder step", "big step", "big decoder forward",
           "big decoder step", "small cache start", "big cache start")
#: tensor methods that read device values into Python
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def pass_costs(models: PairModels, source: torch.Tensor, rows: int = 1, repeats: int = 200) -> dict[str, dict]:
    """Milliseconds per decoder pass over k new tokens for each of ``rows`` sentences, per model."""
    net = {"src_tokens": source[None].expand(rows, -1), "src_lengths": torch.tensor([source.numel()] * rows)}
    repeats = max(10, repeats // rows)
    out = {}
    for name, model in (("big", models.big), ("small", models.small[None])):
        decoder = incremental.IncrementalDecoder(model.decoder)
        encoded = model.encoder.forward_torchscript(net)
        index, out[name] = torch.arange(rows), {}
        with torch.no_grad():
            cache = decoder.start(encoded, 64)
            decoder.forward(cache, index, torch.full((rows, 20), 5), torch.full((rows,), 20))
            for k in KS:
                tokens, counts = torch.full((rows, k), 5), torch.full((rows,), k)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    decoder.forward(cache, index, tokens, counts)
                    cache.length[:] = 20
                out[name][k] = (time.perf_counter() - t0) / repeats * 1e3
            t0 = time.perf_counter()
            for _ in range(repeats):
                decoder.step(cache, torch.full((rows,), 5), 21)
                cache.length[:] = 20
            out[name]["step"] = (time.perf_counter() - t0) / repeats * 1e3
    return out


class StepTimer:
    """Wraps the generator's step methods with timers (seconds and calls per label) and counts
    host reads; ``iterations`` counts loop iterations (small steps, or big steps without one)."""

    def __init__(self, generator_, single_model: str | None = None):
        """``single_model``: the model a one-model variant decodes with (its loop's decoder is
        the generator's ``big`` one, whichever model that is)."""
        self.decoders = {id(generator_.small): "small", id(generator_.big): single_model or "big"}
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self.reads, self.reads_in_steps = 0, 0
        self._in_step = 0
        self._originals = []

    def __enter__(self) -> "StepTimer":
        for names, label in STEPS.items():
            owner = incremental.IncrementalDecoder if names[0] in ("forward", "step", "start") \
                else generator.BildSequenceGenerator
            for name in names:
                if hasattr(owner, name):
                    self._patch(owner, name, self._timed(label, getattr(owner, name)))
        for name in READS:
            self._patch(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))
        return self

    def _patch(self, owner, name, wrapper) -> None:
        self._originals.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, wrapper)

    def _timed(self, label, original):
        def timed(*args, **kwargs):
            if id(args[0]) in self.decoders:
                label_ = f"{self.decoders[id(args[0])]} {label}"
            else:
                label_ = label
            t0 = time.perf_counter()
            self._in_step += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._in_step -= 1
                self.seconds[label_] += time.perf_counter() - t0
                self.calls[label_] += 1
        return timed

    def _counted(self, original):
        def counted(*args, **kwargs):
            self.reads += 1
            self.reads_in_steps += self._in_step > 0
            return original(*args, **kwargs)
        return counted

    @property
    def iterations(self) -> int:
        return self.calls["small step"] or self.calls["big step"]

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._originals):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pair")
    parser.add_argument("source")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--rows", type=lambda t: [int(x) for x in t.split(",")], default=[1],
                        help="sentences per pass in the pass-cost table, e.g. 1,16,64")
    parser.add_argument("--only-passes", action="store_true", help="print the pass-cost table only")
    parser.add_argument("--batch", default="1", help="batching of the per-variant table: N sentences or tokens:N")
    args = parser.parse_args()
    eager = {"wait_share": 0.0, "verify_drafting": False}
    variants = [Variant("big", "big"), Variant("small", "small"), Variant("bild-exact", "bild", exact=True),
                Variant("bild-default", "bild"), Variant("bild-exact-eager", "bild", exact=True, **eager),
                Variant("bild-default-eager", "bild", **eager)]
    models = PairModels(args.pair, variants)
    sources = encode(models.base, read_lines(args.source, args.limit))

    longest = max(sources, key=lambda s: s.numel())
    print("| model | rows | " + " | ".join(f"forward k={k}" for k in KS) + " | step | step per row |\n|---|---|"
          + "---|" * (len(KS) + 2))
    for rows in args.rows:
        for name, row in pass_costs(models, longest, rows).items():
            print(f"| {name} | {rows} | " + " | ".join(f"{row[k]:.3f} ms" for k in KS)
                  + f" | {row['step']:.3f} ms | {row['step'] / rows:.3f} ms |")
    if args.only_passes:
        return

    print("\n`small step` / `big step`: the loop's propose / verify methods (a one-model variant's greedy step "
          "is its verify method, shown as `big step`); `decoder forward` / `decoder step`: the models' own passes.")
    print("Host reads per loop iteration: inside the step methods (the loop adds one more read of its own "
          "in both engines); all reads, per-sentence setup and teardown included.\n")
    print("| variant | ms/token | tokens/big pass | host reads/iteration: in steps, all | "
          + " | ".join(f"{label}: ms/call (calls/token)" for label in COLUMNS) + " |")
    print("|---|---|---|---|" + "---|" * len(COLUMNS))
    batches = [[sources[i] for i in batch] for batch in plan_batches(sources, Batching.parse(args.batch))]
    for v in variants:
        translator = models.translator(v)
        generate(translator, batches[0])  # warm
        before = stats_of(translator)
        with StepTimer(translator.generator, None if v.mode == "bild" else v.mode) as timer:
            seconds, tokens = 0.0, 0
            for batch in batches:
                elapsed, outputs = generate(translator, batch)
                seconds, tokens = seconds + elapsed, tokens + sum(o.numel() for o in outputs)
        big_passes = stats_of(translator).big_passes - before.big_passes
        cells = [f"{1e3 * timer.seconds[m] / timer.calls[m]:.3f} ({timer.calls[m] / tokens:.2f})" if timer.calls[m]
                 else "—" for m in COLUMNS]
        print(f"| {v.name} | {1e3 * seconds / tokens:.3f} | {tokens / big_passes:.2f} | "
              f"{timer.reads_in_steps / timer.iterations:.2f}, {timer.reads / timer.iterations:.2f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
