"""How often a small model agrees with the big one: what BiLD's speed rests on, and what
sequence-level distillation (``bild-jobs distill``) tries to raise.

    python -m jobs.tuning.agreement data/pairs/deen data/corpora/lohelp.de-en.valid.de.xz [small.pt ...]
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
from fairseq.data import data_utils

from bild_fairseq.pairdir import PairSpec
from jobs.shards import read_lines
from jobs.tuning.measure import Batching, PairModels, Variant, encode, measure


@torch.no_grad()
def agreement(small_model: torch.nn.Module, sources: Sequence[torch.Tensor], big_outputs: Sequence[torch.Tensor],
              pad: int, eos: int, batch_size: int = 32) -> float:
    """Share of the positions of the big model's greedy outputs (EOS included) at which the small
    model, fed the same source and the same prefix (teacher forcing), has the big model's token
    as its argmax. With an agreement of 1, BiLD exact mode would never roll back."""
    if len(sources) != len(big_outputs):
        raise ValueError(f"{len(sources)} sources but {len(big_outputs)} big-model outputs")
    device = next(small_model.parameters()).device
    matches = total = 0
    for i in range(0, len(sources), batch_size):
        src, out = list(sources[i:i + batch_size]), list(big_outputs[i:i + batch_size])
        src_tokens = data_utils.collate_tokens(src, pad, eos, left_pad=True).to(device)
        lengths = torch.tensor([s.numel() for s in src], device=device)
        target = data_utils.collate_tokens(out, pad, eos, left_pad=False).to(device)
        prev = data_utils.collate_tokens(out, pad, eos, left_pad=False, move_eos_to_beginning=True).to(device)
        logits, _ = small_model(src_tokens, lengths, prev)
        logits[..., pad] = -math.inf  # never generated, so never a disagreement
        real = target.ne(pad)
        matches += int((logits.argmax(-1).eq(target) & real).sum())
        total += int(real.sum())
    return matches / total if total else 0.0


def pair_agreement(pair: Path, lines: Sequence[str], smalls: Sequence[str | None] = (None,),
                   device: str = "cpu") -> dict[str | None, tuple[float, int]]:
    """Each small model's agreement with the pair's big model on ``lines`` (raw source text),
    and the number of big-model tokens it was measured on."""
    variants = [Variant("big", "big"), *(Variant(f"small@{s}", "small", s) for s in smalls)]
    models = PairModels(pair, variants, device)
    sources = encode(models.base, lines)
    big = measure({"big": models.translator(variants[0])}, sources, Batching.parse("tokens:4096"), 1)["big"].tokens
    tgt = models.base.task.target_dictionary
    tokens = sum(len(t) for t in big)
    return {name: (agreement(models.small[name], sources, big, tgt.pad(), tgt.eos()), tokens) for name in smalls}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Agreement of a pair's small model(s) with its big model on a "
                                                 "source file (the big model's greedy outputs, teacher-forced)")
    parser.add_argument("pair", type=Path, help="pair directory")
    parser.add_argument("source", type=Path, help="source lines (plain, .gz or .xz)")
    parser.add_argument("small", nargs="*", help="small model files in the pair directory [pair.json's]")
    parser.add_argument("--limit", type=int, help="first N lines [all]")
    args = parser.parse_args(argv)
    logging.getLogger("fairseq").setLevel(logging.WARNING)  # the figures only, not fairseq's loading notes
    lines = read_lines(args.source, args.limit)
    for name, (share, tokens) in pair_agreement(args.pair, lines, args.small or [None]).items():
        print(f"{name or PairSpec.load(args.pair).small}: {100 * share:.1f}% of {tokens} big-model tokens "
              f"({len(lines)} lines of {args.source})")


if __name__ == "__main__":
    main()
