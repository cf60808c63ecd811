"""Decoding statistics of a BiLD run: what the paper's speedup comes from."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class BildStats:
    sentences: int = 0
    tokens: int = 0  # emitted, EOS included
    small_tokens: int = 0  # emitted tokens proposed by the small model and kept
    big_tokens: int = 0  # emitted tokens that are the big model's argmax (appended or rollback)
    small_steps: int = 0  # per-sentence small-model decoder passes
    big_calls: int = 0  # per-sentence big-model verifications
    big_passes: int = 0  # big-model calls (one pass verifies many sentences)
    early_checks: int = 0  # verifications of drafting sentences riding along a pass (verify_drafting)
    fallbacks: int = 0  # hand-overs: low confidence or max small steps
    eos_checks: int = 0  # big passes asked for by a small-model EOS
    rollbacks: int = 0
    iterations: int = 0  # decoding-loop iterations (a small step and at most one big pass each)

    def add(self, other: "BildStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def big_token_share(self) -> float:
        return self.big_tokens / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_big_call(self) -> float:
        return self.tokens / self.big_calls if self.big_calls else 0.0

    @property
    def big_passes_per_token(self) -> float:
        """What the batch policy minimises: big-model calls per emitted token."""
        return self.big_passes / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "big_token_share": self.big_token_share,
                "tokens_per_big_call": self.tokens_per_big_call, "big_passes_per_token": self.big_passes_per_token}

    def summary(self) -> str:
        return (f"BiLD: {self.sentences} sentences, {self.tokens} tokens ({self.small_tokens} small, "
                f"{self.big_tokens} big = {100 * self.big_token_share:.1f}%), {self.small_steps} small steps, "
                f"{self.big_calls} big calls ({self.tokens_per_big_call:.2f} tokens/call) in {self.big_passes} "
                f"big passes ({self.big_passes_per_token:.3f}/token), "
                f"{self.fallbacks} fallbacks, {self.eos_checks} EOS checks, {self.rollbacks} rollbacks")
