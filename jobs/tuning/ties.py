"""Why two greedy decoders' outputs differ: at the first differing token, how far apart were the
big model's two best log-probabilities? Within the margin, the difference is a near tie that any
change of kernel or rounding may flip (the ONNX Runtime engine against stock fairseq, a CUDA
k-token pass against a one-token step), not an error.

The exactness contract (README, "Exactness, per engine"): on the CPU in fp32, exact mode's output
is the big model's greedy output bit for bit (the tests assert it). On a GPU, CUDA chooses kernels
by shape, so a k-token pass and a one-token step may round one token's scores differently, and
fp16/bf16 round every logit: there the output is the big model's greedy output except where, at
the first differing token, its two best log-probabilities are within ``MARGIN[precision]``; the
comparisons count those near ties (:func:`near_ties`) instead of asserting identity.
"""
from __future__ import annotations

from typing import Sequence

import torch

#: a gap between the two best log-probabilities below this is float noise (fp32 engines differ
#: by ~1e-5 in a log-probability)
NOISE = 1e-4
#: the near-tie margin per precision: fp32's float noise; for fp16 and bf16, two units in the last
#: place of a logit of magnitude 20 (2 * 20 * 2^-11 ~ 0.02, 2 * 20 * 2^-8 ~ 0.16). Chosen, not
#: yet measured on a GPU: scripts/gpu-check.sh reports the largest gap it sees
MARGIN = {"fp32": NOISE, "fp16": 0.02, "bf16": 0.16}


def first_divergence_gaps(model: torch.nn.Module, sources: Sequence[torch.Tensor], ours: Sequence[torch.Tensor],
                          reference: Sequence[torch.Tensor], eos: int) -> list[float]:
    """For each line where ``ours`` differs from ``reference`` (token ids, EOS included): the gap
    between ``model``'s two best log-probabilities at the first differing position, given the
    reference's prefix (teacher-forced, fairseq's own forward, on the model's device and dtype)."""
    device = next(model.parameters()).device
    gaps = []
    for src, a, b in zip(sources, ours, reference):
        a, b = a.cpu(), b.cpu()
        if torch.equal(a, b):
            continue
        at = next((i for i, (x, y) in enumerate(zip(a.tolist(), b.tolist())) if x != y), min(len(a), len(b)))
        prev = torch.cat([torch.tensor([eos]), b[:at]]).unsqueeze(0).to(device)
        with torch.no_grad():
            enc = model.encoder(src.unsqueeze(0).to(device), src_lengths=torch.tensor([src.numel()], device=device))
            lprobs = model.get_normalized_probs(model.decoder(prev, encoder_out=enc), log_probs=True)[0, -1]
        top = lprobs.float().topk(2).values
        gaps.append(float(top[0] - top[1]))
    return gaps


def summary(gaps: list[float], lines: int, margin: float = NOISE) -> dict:
    return {"lines": lines, "differing": len(gaps), "near_ties": sum(g < margin for g in gaps), "margin": margin,
            "largest_gap": max(gaps, default=None)}


def near_ties(model: torch.nn.Module, sources: Sequence[torch.Tensor], ours: Sequence[torch.Tensor],
              reference: Sequence[torch.Tensor], eos: int, precision: str = "fp32") -> dict:
    """How many lines differ, and how many of those start at a near tie at ``precision``'s margin
    (the contract holds when the two counts are equal)."""
    return summary(first_divergence_gaps(model, sources, ours, reference, eos), len(sources), MARGIN[precision])
