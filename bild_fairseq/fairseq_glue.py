"""Everything that touches fairseq internals, in one place (see README, "How the plugin hooks in")."""
from __future__ import annotations

from bild_fairseq.safe_load import allow_fairseq_checkpoints

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    allow_fairseq_checkpoints()
    _installed = True
