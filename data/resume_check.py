"""What resuming from a committed resume point costs: from one full training checkpoint, train K
more updates three ways and compare the validation perplexity after them:

  full       the checkpoint itself (Adam's moments intact): how the run would have gone on;
  factored   its resume point as ``save_resume_point`` writes it (second moments factored);
  reset      the same point without the moments (as points were written before 2026-12-02).

The same batches in the same order each time (the recipe's seed, the checkpoint's epoch), so the
differences are the restored optimizer state's. Nothing is saved; only train.log is kept.

    python data/resume_check.py deen big-iwslt data/work/deen/ckpt-big-iwslt/checkpoint_last.pt --updates 2,20 [-- OPTIONS]
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.corpora import CORPORA  # noqa: E402
from data.train import SIZES, save_resume_point, split_fairseq_args, train  # noqa: E402

VALID_PPL = re.compile(r"valid on 'valid' subset \|.* ppl ([\d.]+) \|.* num_updates (\d+)")


def last_valid_ppl(log: Path) -> tuple[float, int]:
    """(perplexity, update count) of the last validation in a fairseq-train log."""
    found = VALID_PPL.findall(log.read_text())
    if not found:
        raise SystemExit(f"{log}: fairseq-train logged no validation; read the log for why")
    ppl, updates = found[-1]
    return float(ppl), int(updates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("size", choices=sorted(SIZES))
    parser.add_argument("checkpoint", type=Path, help="a full fairseq training checkpoint (checkpoint_last.pt)")
    parser.add_argument("--work", type=Path, help="the prepared corpus (default data/work/CORPUS)")
    parser.add_argument("--updates", default="2,20", help="comma-separated K: updates after the checkpoint")
    parser.add_argument("--threads", type=int, default=1)
    parser.epilog = "Options after -- go to fairseq-train verbatim (those the checkpoint was trained with beyond the recipe)."
    ours, fairseq_args = split_fairseq_args(sys.argv[1:])
    args = parser.parse_args(ours)
    bin_dir = (args.work or Path(__file__).resolve().parent / "work" / args.corpus) / "bin"
    start = torch.load(args.checkpoint, map_location="cpu")["optimizer_history"][-1]["num_updates"]
    with tempfile.TemporaryDirectory(prefix="resume-check-") as tmp:
        tmp = Path(tmp)
        factored = save_resume_point(args.checkpoint, tmp / "factored.pt")
        legacy = torch.load(factored, map_location="cpu")
        del legacy["adam_second_moments"]
        torch.save(legacy, tmp / "reset.pt")
        print(f"from {args.checkpoint} at {start} updates: valid ppl after K more")
        print("| K | full | factored | reset |\n|---|---|---|---|")
        for k in (int(k) for k in args.updates.split(",")):
            row = []
            for variant in ("full", "factored", "reset"):
                save_dir = tmp / f"{variant}-{k}"
                save_dir.mkdir()
                if variant == "full":
                    (save_dir / "checkpoint_last.pt").symlink_to(args.checkpoint.resolve())
                resume = None if variant == "full" else tmp / f"{variant}.pt"
                train(bin_dir, save_dir, args.size, 1000.0, 10_000, args.threads,
                      [*fairseq_args, "--max-update", str(start + k), "--no-save"], resume=resume)
                ppl, updates = last_valid_ppl(save_dir / "train.log")
                if updates != start + k:
                    raise SystemExit(f"{variant}: validated at {updates} updates, not {start + k}")
                row.append(f"{ppl:.2f}")
            print(f"| {k} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
