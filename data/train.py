"""Train a big/small model pair on a prepared corpus and export it as a pair directory.

    python data/train.py deen            # prepare (if needed), train small + big, export data/pairs/deen
    python data/train.py summ --hours-big 0.6
    python data/train.py deen --export-only   # (re)write data/pairs/deen from the best checkpoints
    python data/train.py deen --export-only --only big --big-size big-iwslt   # replace big.pt only
    python data/train.py summ --only big --hours-big 8 -- --dropout 0.3   # extra fairseq-train options

Training resumes from the last checkpoint when rerun (fairseq's checkpoint_last.pt). On another
machine (data/work/ is not in git) it resumes from the committed resume point
data/checkpoints/CORPUS-SIZE.pt, which ``--save-resume`` writes (see ``save_resume_point``).
Sizes are chosen for 2 CPU cores: see data/README.md for the reasoning and the measured results.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bild_fairseq.checkpoints import CheckpointError, export_for_inference, inference_state, last_interval_checkpoints  # noqa: E402
from bild_fairseq.config import DEFAULTS, THRESHOLDS  # noqa: E402
from bild_fairseq.pairdir import PairSpec  # noqa: E402
from data.corpora import CORPORA, Corpus  # noqa: E402

COMMON = [
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "400", "--warmup-init-lr", "1e-07",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--weight-decay", "0.0001", "--max-tokens", "4096", "--no-progress-bar", "--log-interval", "50",
    "--save-interval-updates", "500", "--keep-interval-updates", "5", "--no-epoch-checkpoints",
    "--user-dir", str(ROOT / "bild_fairseq"), "--num-workers", "0", "--seed", "1",
]

#: Big: a 256-dim transformer with a 5-layer decoder. Small: same 256-dim 2-layer encoder
#: (runs once per sentence) and a 1-layer 128-dim decoder, ~6x fewer decoder FLOPs per token.
#: big-iwslt: fairseq's own ``transformer_iwslt_de_en`` (6+6 layers, 512-dim, FFN 1024, 4 heads;
#: the model of fairseq's IWSLT'14 de-en example) with its usual dropout 0.3, lr 5e-4, and a
#: warm-up shortened to 1,000 updates for a corpus of ~220 updates per epoch.
SIZES = {
    "big-iwslt": [
        "--arch", "transformer_iwslt_de_en", "--share-all-embeddings", "--dropout", "0.3", "--lr", "5e-4",
        "--warmup-updates", "1000",
    ],
    "big": [
        "--arch", "transformer", "--encoder-layers", "4", "--decoder-layers", "5", "--encoder-embed-dim", "256",
        "--decoder-embed-dim", "256", "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--share-all-embeddings",
        "--dropout", "0.1", "--lr", "0.001",
    ],
    "small": [
        "--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "1", "--encoder-embed-dim", "256",
        "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "512",
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "2",
        "--share-decoder-input-output-embed", "--dropout", "0.1", "--lr", "0.001",
    ],
}


#: committed resume points, one per corpus and size (data/work/ does not follow a run to a new machine)
RESUME_DIR = ROOT / "data" / "checkpoints"


def train(bin_dir: Path, save_dir: Path, size: str, hours: float, max_epoch: int, threads: int,
          extra: list[str], resume: Path | None = None) -> Path:
    """``fairseq-train`` with the recipe; in a save directory without checkpoint_last.pt it starts
    from ``resume`` (a resume point) when that exists. ``hours`` counts the run's whole training
    time, the resume point's included (fairseq's --stop-time-hours)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    restore = (["--restore-file", str(restorable(resume, save_dir / "resume-point-restored.pt"))]
               if resume is not None and resume.is_file() and not (save_dir / "checkpoint_last.pt").exists() else [])
    # extra options come last: for fairseq the last occurrence of an option wins
    cmd = ["fairseq-train", str(bin_dir), *COMMON, *SIZES[size], "--save-dir", str(save_dir),
           "--stop-time-hours", str(hours), "--max-epoch", str(max_epoch), *restore, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(save_dir / "train.log", "a") as log:
        print(" ".join(cmd), file=log, flush=True)
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return save_dir / "checkpoint_best.pt"


def split_fairseq_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """A command line's own options and, after ``--``, those that go to fairseq-train verbatim."""
    split = argv.index("--") if "--" in argv else len(argv)
    return argv[:split], argv[split + 1:]


def save_resume_point(checkpoint: Path, dst: Path) -> Path:
    """A training checkpoint (checkpoint_last.pt) made small enough to commit: fp16 weights, the
    run's progress (update count, epoch and place in it, learning-rate schedule, training time),
    and Adam's second moments factored as Adafactor keeps them (each matrix's row and column
    means: under a megabyte, where the moments themselves would triple the file). ``restorable`` expands
    them again, so the run goes on at its update count and learning rate with step sizes of the
    right scale; only the first moments (momentum) restart from zero, which Adam refills within
    tens of updates. Without second moments the first step after a resume moves every weight by
    the full learning rate (transformer_iwslt_de_en: valid ppl 57.5 -> 68.3 in two updates)."""
    state = torch.load(checkpoint, map_location="cpu")  # weights-only, fairseq allow-list
    optimizer = state["last_optimizer_state"]
    point = inference_state(state["cfg"], state["model"], fp16=True)
    point.update(
        optimizer_history=state["optimizer_history"], criterion=state.get("criterion", {}),
        task_state=state.get("task_state", {}),
        extra_state={k: v for k, v in state["extra_state"].items() if k != "metrics"},  # meters restart
        last_optimizer_state={"state": {}, "param_groups": optimizer["param_groups"]},
        adam_second_moments={i: {"step": s["step"], **_factored(s["exp_avg_sq"])} for i, s in optimizer["state"].items()},
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(point, dst)
    return dst


def restorable(point: Path, dst: Path) -> Path:
    """A resume point as fairseq's --restore-file takes it: its factored second moments expanded
    into Adam's state (first moments zero) in ``dst``; a point without them (written before they
    were kept) is returned as it is, and fairseq's Adam starts its moments from zero."""
    state = torch.load(point, map_location="cpu")
    moments = state.pop("adam_second_moments", None)
    if not moments:
        return point
    adam = {}
    for i, factors in moments.items():
        second = _expanded(factors)
        adam[i] = {"step": factors["step"], "exp_avg": torch.zeros_like(second), "exp_avg_sq": second}
    state["last_optimizer_state"]["state"] = adam
    torch.save(state, dst)
    return dst


def _factored(second: torch.Tensor) -> dict:
    """A second moment as Adafactor stores it: a matrix by its row and column means (a vector whole)."""
    if second.dim() < 2:
        return {"exp_avg_sq": second.float()}
    rows = second.float().reshape(-1, second.shape[-1])
    return {"shape": list(second.shape), "row": rows.mean(1), "col": rows.mean(0)}


def _expanded(factors: dict) -> torch.Tensor:
    """The rank-1 matrix with the stored row and column means (Adafactor's estimate)."""
    if "exp_avg_sq" in factors:
        return factors["exp_avg_sq"]
    row, col = factors["row"], factors["col"]
    return (torch.outer(row, col) / row.mean().clamp_min(torch.finfo(row.dtype).tiny)).reshape(factors["shape"])


def export_pair(corpus: Corpus, work: Path, out: Path, average_big: int = 1, big_size: str = "big",
                roles: tuple[str, ...] = ("big", "small")) -> Path:
    """Write a pair directory: fp16 inference checkpoints, dictionaries, BPE codes, pair.json.
    ``roles`` ("big",) replaces only the big model of an existing pair, keeping its small models
    (e.g. a distilled one, whose training checkpoints live elsewhere or on another machine)."""
    missing = [f"{role}.pt" for role in ("big", "small") if role not in roles and not (out / f"{role}.pt").is_file()]
    if missing:
        raise SystemExit(f"{out} has no {missing[0]} to keep: export both models (without --only)")
    out.mkdir(parents=True, exist_ok=True)
    for name, size, average in (("big", big_size, average_big), ("small", "small", 1)):
        if name in roles:
            export_for_inference(last_interval_checkpoints(work / f"ckpt-{size}", average), out / f"{name}.pt", fp16=True)
    for suffix in (corpus.src_suffix, corpus.tgt_suffix):
        shutil.copy(work / "bin" / f"dict.{suffix}.txt", out / f"dict.{suffix}.txt")
    shutil.copy(work / "bpe.codes", out / "bpe.codes")
    old = PairSpec.load(out) if (out / "pair.json").exists() else None
    spec = PairSpec(
        directory=out, task="summarization" if corpus.name == "summ" else "translation",
        source_lang=corpus.src_suffix, target_lang=corpus.tgt_suffix,
        moses_source_lang=corpus.src_lang, moses_target_lang=corpus.tgt_lang,
        max_source_tokens=corpus.max_source_tokens,
        bild=old.bild if old else {k: DEFAULTS[k] for k in THRESHOLDS},  # keep thresholds a sweep wrote
        small=old.small if old and (out / old.small).is_file() else "small.pt",  # and an aligned default
        generation={"max_len_a": 0, "max_len_b": corpus.max_len_b},
    )
    spec.save()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("--work", type=Path, help="work directory (default data/work/CORPUS)")
    parser.add_argument("--only", choices=["big", "small"],
                        help="train one model only; with --export-only, replace only that model in the pair directory")
    parser.add_argument("--big-size", choices=[k for k in SIZES if k.startswith("big")], default="big",
                        help="the big model's size (SIZES); trains in and exports from WORK/ckpt-SIZE")
    parser.add_argument("--hours-big", type=float, default=0.75, help="wall-clock budget for the big model")
    parser.add_argument("--hours-small", type=float, default=0.25, help="wall-clock budget for the small model")
    parser.add_argument("--max-epoch", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export-only", action="store_true", help="only write the pair directory")
    parser.add_argument("--average-big", type=int, default=1, metavar="N",
                        help="ship the mean of the big model's last N interval checkpoints instead of the best one")
    parser.add_argument("--pair-dir", type=Path, help="pair directory to write (default data/pairs/CORPUS)")
    parser.add_argument("--save-resume", action="store_true",
                        help="after training, write the resume point data/checkpoints/CORPUS-SIZE.pt of each "
                             "model trained (commit it to continue the run on another machine)")
    parser.epilog = ("Options after -- go to fairseq-train verbatim and override the recipe's "
                     "(e.g. -- --dropout 0.3 when resuming a model that overfits).")
    ours, fairseq_args = split_fairseq_args(sys.argv[1:])
    args = parser.parse_args(ours)
    work = args.work or ROOT / "data" / "work" / args.corpus
    bin_dir = work / "bin"
    if not (bin_dir / "preprocess.log").exists():
        subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), args.corpus, "--out", str(work)], check=True)
    for role, size in (("small", "small"), ("big", args.big_size)):
        if args.only in (None, role) and not args.export_only:
            hours = args.hours_big if role == "big" else args.hours_small
            resume = RESUME_DIR / f"{args.corpus}-{size}.pt"
            save_dir = work / f"ckpt-{size}"
            print(train(bin_dir, save_dir, size, hours, args.max_epoch, args.threads, fairseq_args, resume))
            if args.save_resume:
                print(save_resume_point(save_dir / "checkpoint_last.pt", resume))
    if args.only is None or args.export_only:
        try:
            print(export_pair(CORPORA[args.corpus], work, args.pair_dir or ROOT / "data" / "pairs" / args.corpus,
                              args.average_big, args.big_size, (args.only,) if args.only else ("big", "small")))
        except CheckpointError as e:
            raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
