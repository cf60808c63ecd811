"""Evaluate a pair directory's big and small models on the test split and write a report.

    python data/evaluate.py deen            # -> data/pairs/deen/report.{json,md}
    python data/evaluate.py summ --limit 300
    python data/evaluate.py deen --big data/checkpoints/deen-big-iwslt.pt --out /tmp/iwslt   # a training checkpoint

Reports quality (BLEU/chrF with sacrebleu signatures, or ROUGE), parameters, decoder
multiply-accumulates per generated token and the measured time of one incremental decoder step
(the models' timings interleaved: on a shared machine read their ratio, not the milliseconds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bild_fairseq.api import PairTranslator  # noqa: E402
from bild_fairseq.incremental import EncoderOutput, IncrementalDecoder  # noqa: E402
from bild_fairseq.pairdir import PairSpec  # noqa: E402
from bild_fairseq.scoring import score_task  # noqa: E402
from data.corpora import CORPORA  # noqa: E402
from jobs.shards import read_lines  # noqa: E402


def decoder_macs_per_token(model) -> int:
    """Weight multiply-accumulates of one incremental decoder step (attention scores excluded:
    they grow with length and are small at these lengths; cross-attention keys/values are
    computed once per sentence, so they are excluded too)."""
    d = model.decoder
    total = d.output_projection.weight.numel()
    for m in (d.project_in_dim, d.project_out_dim):
        total += m.weight.numel() if m is not None else 0
    for layer in d.layers:
        sa, ea = layer.self_attn, layer.encoder_attn
        total += sum(p.weight.numel() for p in (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj, ea.q_proj, ea.out_proj,
                                                  layer.fc1, layer.fc2))
    return total


def step_ms(model, prefix: int = 20, source_len: int = 25, repeats: int = 30) -> float:
    """Median wall time of one batch-1 incremental decoder step (output projection included)."""
    dec = IncrementalDecoder(model.decoder)
    src = torch.randint(4, 100, (1, source_len))
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=torch.tensor([source_len]))
        cache = dec.start(EncoderOutput.of(enc), prefix + repeats + 2)
        dec.forward(cache, torch.tensor([0]), torch.randint(4, 100, (1, prefix)), torch.tensor([prefix]))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dec.forward(cache, torch.tensor([0]), torch.randint(4, 100, (1, 1)), torch.tensor([1]))
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def interleaved_step_ms(models: dict[str, torch.nn.Module], rounds: int = 5) -> dict[str, float]:
    """Each model's ``step_ms``, measured in ``rounds`` alternating rounds and reduced to the median,
    so that a slow spell of a shared machine slows every model alike and their ratio holds."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(step_ms(model))
    return {name: statistics.median(t) for name, t in times.items()}


def evaluate(corpus_name: str, pair_dir: Path, limit: int | None, big: Path | None = None,
             step_rounds: int = 5) -> dict:
    """``big``: a checkpoint to evaluate in place of the pair's big model (the small rows stay);
    ``step_rounds``: interleaved rounds of the decoder-step timing."""
    corpus = CORPORA[corpus_name]
    sources = read_lines(corpus.path("test", corpus.src_suffix), limit)
    refs = read_lines(corpus.path("test", corpus.tgt_suffix), limit)
    report = {"pair": str(pair_dir), "test_lines": len(sources), "models": {}}
    default_small = PairSpec.load(pair_dir).small
    # rows: big, the pair's small model, then any other small model in the directory (e.g. the
    # unaligned small.pt next to a distilled default)
    others = sorted(f.name for f in pair_dir.glob("small*.pt") if f.name != default_small)
    models = {}
    for row, mode, checkpoint in [("big", "big", None), ("small", "small", None), *[(n, "small", n) for n in others]]:
        t = PairTranslator.from_pair_dir(pair_dir, mode=mode, small_checkpoint=checkpoint, big_checkpoint=big)
        model = models[row] = t.generator.model.single_model
        out = t.translate(sources, max_tokens=4000)
        report["task"] = t.spec.task
        report["models"][row] = {
            "file": t.settings["models"][0],
            "scores": [s.to_dict() for s in score_task(t.spec.task, out.hypotheses, refs)],
            "parameters": sum(p.numel() for p in model.parameters()),
            "decoder_macs_per_token": decoder_macs_per_token(model),
            "architecture": {k: getattr(model.cfg if hasattr(model, "cfg") else model.args, k, None) for k in (
                "encoder_layers", "decoder_layers", "encoder_embed_dim", "decoder_embed_dim", "decoder_ffn_embed_dim")},
        }
    for row, ms in interleaved_step_ms(models, step_rounds).items():
        report["models"][row]["decoder_step_ms"] = ms
    big, small = report["models"]["big"], report["models"]["small"]
    report["decoder_macs_ratio"] = big["decoder_macs_per_token"] / small["decoder_macs_per_token"]
    report["decoder_step_time_ratio"] = big["decoder_step_ms"] / small["decoder_step_ms"]
    return report


def markdown(report: dict, command: str) -> str:
    names = [s["name"] for s in report["models"]["big"]["scores"]]
    lines = [f"Test split: {report['test_lines']} lines. Reproduce: `{command}`", "",
             "| model | " + " | ".join(names) + " | parameters | decoder MACs/token | decoder step (ms, batch 1) |",
             "|---" * (len(names) + 4) + "|"]
    for row, m in report["models"].items():
        scores = " | ".join(f"{s['value']:.2f}" for s in m["scores"])
        lines.append(f"| {row} (`{m['file']}`) | {scores} | {m['parameters'] / 1e6:.2f}M | {m['decoder_macs_per_token'] / 1e6:.2f}M "
                     f"| {m['decoder_step_ms']:.2f} |")
    lines += ["", f"Big/small decoder MACs per token: {report['decoder_macs_ratio']:.1f}x; "
                  f"measured decoder step time: {report['decoder_step_time_ratio']:.1f}x.", "",
              "Signatures: " + "; ".join(s["signature"] for s in report["models"]["big"]["scores"][:2])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("--pair", type=Path, help="pair directory (default data/pairs/CORPUS)")
    parser.add_argument("--limit", type=int, help="evaluate on the first N test lines only")
    parser.add_argument("--big", type=Path, help="evaluate this checkpoint as the big model (e.g. a training checkpoint "
                                                 "or resume point trained on the pair's dictionaries)")
    parser.add_argument("--out", type=Path, help="write report.{json,md} here [the pair directory; with --big, "
                                                 "only printed unless --out is given]")
    args = parser.parse_args()
    pair = args.pair or ROOT / "data" / "pairs" / args.corpus
    out = args.out or (None if args.big else pair)
    torch.set_num_threads(1)
    report = evaluate(args.corpus, pair, args.limit, args.big and args.big.resolve())
    command = "python data/evaluate.py " + " ".join(sys.argv[1:])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(markdown(report, command))
    print(markdown(report, command))


if __name__ == "__main__":
    main()
