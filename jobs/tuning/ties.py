"""Why two greedy decoders' outputs differ: at the first differing token, how far apart were the
big model's two best log-probabilities? Within float noise, the difference is a near tie that
any change of kernel may flip (the ONNX Runtime engine against stock fairseq, say), not an error."""
from __future__ import annotations

from typing import Sequence

import torch

#: a gap between the two best log-probabilities below this is float noise (fp32 engines differ
#: by ~1e-5 in a log-probability)
NOISE = 1e-4


def first_divergence_gaps(model: torch.nn.Module, sources: Sequence[torch.Tensor], ours: Sequence[torch.Tensor],
                          reference: Sequence[torch.Tensor], eos: int) -> list[float]:
    """For each line where ``ours`` differs from ``reference`` (token ids, EOS included): the gap
    between ``model``'s two best log-probabilities at the first differing position, given the
    reference's prefix (teacher-forced, fairseq's own forward)."""
    gaps = []
    for src, a, b in zip(sources, ours, reference):
        if torch.equal(a, b):
            continue
        at = next((i for i, (x, y) in enumerate(zip(a.tolist(), b.tolist())) if x != y), min(len(a), len(b)))
        prev = torch.cat([torch.tensor([eos]), b[:at]]).unsqueeze(0)
        with torch.no_grad():
            enc = model.encoder(src.unsqueeze(0), src_lengths=torch.tensor([src.numel()]))
            lprobs = model.get_normalized_probs(model.decoder(prev, encoder_out=enc), log_probs=True)[0, -1]
        top = lprobs.topk(2).values
        gaps.append(float(top[0] - top[1]))
    return gaps


def summary(gaps: list[float], lines: int) -> dict:
    return {"lines": lines, "differing": len(gaps), "near_ties": sum(g < NOISE for g in gaps),
            "largest_gap": max(gaps, default=None)}
