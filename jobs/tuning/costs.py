"""Where decoding time goes on this machine, per engine: the cost of each model call, and the
decoding loop's own bookkeeping between calls.

    OMP_NUM_THREADS=1 python -m jobs.tuning.costs data/pairs/deen data/corpora/lohelp.de-en.test.de.xz --limit 100

1. :func:`pass_costs`: milliseconds per model call on each engine (torch, ONNX Runtime fp32 and
   8-bit): the one-token step (every proposal, and the big-only loop), a k-token pass for
   k = 1, 2, 4, 8 (BiLD's verification: it bets a k-token pass costs about one step), for each
   of ``--rows`` sentences after a 20-token prefix.
2. :class:`LoopTimer`: one variant's decoding time split into model calls (its engines' start,
   step and forward, timed on the instances) and the loop's bookkeeping: search-rule-free state
   updates, policies, argmax handling, cache appends, per loop iteration. Also the host reads
   per iteration (``item``, ``tolist``, ...: each stalls a GPU's launch queue). The wrappers add
   about a microsecond per call; ``bild-jobs bench`` reports this split for batch 1.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from bild_fairseq.engines import build_engine
from bild_fairseq.rules import SearchRules
from jobs.shards import read_lines
from jobs.tuning.measure import Batching, PairModels, Variant, encode, generate, plan_batches, small_suffix

KS = (1, 2, 4, 8)
#: engine, 8-bit weights -> the label tables use
ENGINES = {("torch", False): "torch", ("onnxruntime", False): "ort fp32", ("onnxruntime", True): "ort int8"}
#: tensor methods that read device values into Python
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def pass_costs(models: PairModels, source: torch.Tensor, engines=tuple(ENGINES), rows: int = 1,
               repeats: int = 200, budget_s: float = 0.25) -> dict[str, dict]:
    """Milliseconds per call, per engine label and model (``big``; pair.json's small model as
    ``small``, any other as ``small@NAME``, as the bench names its variants): ``step`` and
    k-token ``forward`` passes, on the models' device (a GPU synchronized before the clock is
    read). Each call is repeated
    ``repeats`` times, or fewer (at least 10) once ``budget_s`` is spent: slow calls (bf16 on a
    CPU without bf16 units) would otherwise take minutes."""
    tgt = models.base.task.target_dictionary
    rules = SearchRules(len(tgt), tgt.pad(), tgt.unk(), tgt.eos())
    device = next(models.big.parameters()).device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    src = source[None].expand(rows, -1).contiguous().to(device)
    lengths = torch.tensor([source.numel()] * rows, device=device)
    index, max_len = torch.arange(rows, device=device), torch.full((rows,), 1000, device=device)
    repeats = max(10, repeats // rows)
    tokens = lambda k: torch.full((rows, k), 5, device=device)  # noqa: E731
    out = {}
    for engine, int8 in engines:
        smalls = [(f"small{small_suffix(name)}", model) for name, model in models.small.items()]
        for name, model in (("big", models.big), *smalls):
            runtime = build_engine(model, engine, int8)
            row = out.setdefault(f"{ENGINES[engine, int8]} {name}", {})
            with torch.no_grad():
                cache = runtime.start(runtime.encode(src, lengths), 64)
                runtime.forward(cache, index, tokens(20), torch.full((rows,), 20, device=device), 20, True, rules,
                                max_len)
                calls = {f"forward k={k}": (lambda k=k: runtime.forward(
                    cache, index, tokens(k), torch.full((rows,), k, device=device), 20 + k, True, rules, max_len))
                    for k in KS}
                calls["step"] = lambda: runtime.step(cache, tokens(1)[:, 0], 21, rules, max_len)
                for label, call in calls.items():
                    call()  # warm
                    cache.length[:] = 20
                    sync()
                    t0, done = time.perf_counter(), 0
                    while done < repeats and (done < 10 or time.perf_counter() - t0 < budget_s):
                        call()
                        cache.length[:] = 20
                        done += 1
                    sync()
                    row[label] = (time.perf_counter() - t0) / done * 1e3
    return out


class LoopTimer:
    """Times the model calls of a generator's engines (instance methods, whatever the engine)
    and counts host reads, while a variant decodes; see the module docstring."""

    def __init__(self, generator):
        self.generator = generator
        self.engines = {"big": generator.big, "small": generator.small}
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self.reads = 0
        self._patched: list[tuple[object, str, object]] = []
        # on a GPU a call returns once its kernels are queued: synchronize around each timed call,
        # so "model" is the kernels' time and "bookkeeping" the loop's own (kernels included)
        device = next(generator.model.models[0].parameters()).device
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def __enter__(self) -> "LoopTimer":
        self._iterations = self.generator.stats.iterations
        for model, engine in self.engines.items():
            if engine is not None:
                for name in ("start", "step", "forward"):
                    self._patch(engine, name, self._timed(f"{model} {name}", getattr(engine, name)), instance=True)
        for name in READS:
            self._patch(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))
        return self

    def _patch(self, owner, name: str, wrapper, instance: bool = False) -> None:
        self._patched.append((owner, name, None if instance else owner.__dict__.get(name)))
        setattr(owner, name, wrapper)

    def _timed(self, label: str, original):
        def timed(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1
        return timed

    def _counted(self, original):
        def counted(*args, **kwargs):
            self.reads += 1
            return original(*args, **kwargs)
        return counted

    def __exit__(self, *exc) -> None:
        self.iterations = self.generator.stats.iterations - self._iterations
        for owner, name, original in reversed(self._patched):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

    def split(self, total_seconds: float) -> dict:
        """``total_seconds`` (the decoding time inside this timer) as model calls and bookkeeping."""
        model = sum(self.seconds.values())
        iterations = max(self.iterations, 1)
        return {"iterations": self.iterations, "model_ms": 1e3 * model,
                "bookkeeping_ms_per_iteration": 1e3 * (total_seconds - model) / iterations,
                "host_reads_per_iteration": self.reads / iterations,
                "calls": {k: {"calls": self.calls[k], "ms_per_call": 1e3 * self.seconds[k] / self.calls[k]}
                          for k in sorted(self.calls)}}


def loop_split(translator, batches: list[list[torch.Tensor]]) -> dict:
    """One untimed warm batch, then every batch under a :class:`LoopTimer`: :meth:`LoopTimer.split`."""
    generate(translator, batches[0])
    with LoopTimer(translator.generator) as timer:
        seconds = sum(generate(translator, batch)[0] for batch in batches)
    return timer.split(seconds)


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
    variants = [Variant(f"{name}{tag}", mode, exact=name == "bild-exact", engine=engine, int8=int8)
                for (engine, int8), tag in zip(ENGINES, ("", "/ort", "/ort8"))
                for name, mode in (("big", "big"), ("bild-exact", "bild"), ("bild-default", "bild"))]
    models = PairModels(args.pair, variants + [Variant("small", "small")])
    sources = encode(models.base, read_lines(args.source, args.limit))

    longest = max(sources, key=lambda s: s.numel())
    labels = [f"forward k={k}" for k in KS] + ["step"]
    print("| engine, model | rows | " + " | ".join(labels) + " |\n|---|---|" + "---|" * len(labels))
    for rows in args.rows:
        for name, row in pass_costs(models, longest, rows=rows).items():
            print(f"| {name} | {rows} | " + " | ".join(f"{row[k]:.3f} ms" for k in labels) + " |")
    if args.only_passes:
        return
    print("\n| variant | ms/token | iterations/token | bookkeeping ms/iteration | host reads/iteration | "
          "model calls: ms/call (calls) |\n|---|---|---|---|---|---|")
    batches = [[sources[i] for i in batch] for batch in plan_batches(sources, Batching.parse(args.batch))]
    for v in variants:
        translator = models.translator(v)
        tokens = sum(o.numel() for batch in batches for o in generate(translator, batch)[1])
        split = loop_split(translator, batches)
        calls = ", ".join(f"{k} {c['ms_per_call']:.3f} ({c['calls']})" for k, c in split["calls"].items())
        total_ms = split["model_ms"] + split["bookkeeping_ms_per_iteration"] * split["iterations"]
        print(f"| {v.name} | {total_ms / tokens:.3f} | {split['iterations'] / tokens:.2f} | "
              f"{split['bookkeeping_ms_per_iteration']:.3f} | {split['host_reads_per_iteration']:.2f} | {calls} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
