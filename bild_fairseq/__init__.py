"""Big Little Decoder (BiLD) for fairseq, loaded with ``--user-dir``.

Importing the package (which fairseq does for ``--user-dir``) allow-lists fairseq's checkpoint
contents for torch's weights-only loader, registers the ``--bild`` generation options and the
``bild_distillation`` training criterion (word-level distillation for ``bild-jobs distill``) and
the ``transformer_frozen_encoder`` architecture (a student trained on the big model's encoder).
"""
from bild_fairseq.fairseq_glue import install

install()
from bild_fairseq import distillation  # noqa: E402,F401  (registers --criterion bild_distillation)
from bild_fairseq import frozen_encoder  # noqa: E402,F401  (registers --arch transformer_frozen_encoder)
