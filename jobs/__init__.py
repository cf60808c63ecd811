"""bild-jobs: sharded, resumable batch decoding of large corpora with a BiLD pair (local or Slurm)."""
