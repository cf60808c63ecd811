"""How often a small model agrees with the big one: what BiLD's speed rests on, and what
sequence-level distillation (``bild-jobs distill``) tries to raise."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from fairseq.data import data_utils


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
