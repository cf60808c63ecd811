"""Big Little Decoder (BiLD) for fairseq, loaded with ``--user-dir``.

Importing the package (which fairseq does for ``--user-dir``) allow-lists fairseq's checkpoint
contents for torch's weights-only loader and registers the ``--bild`` generation options.
"""
from bild_fairseq.fairseq_glue import install

install()
