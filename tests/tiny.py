"""Tiny random fairseq transformer pairs over a real prepared corpus slice, for mechanics tests."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = str(ROOT / "bild_fairseq")  # what users pass to --user-dir
sys.path.insert(0, str(ROOT))

from bild_fairseq.checkpoints import inference_state  # noqa: E402
from bild_fairseq.pairdir import PairSpec  # noqa: E402

WEIGHT_SCALE = 3.0
POSITION_SCALE = 8.0
EOS_SCALE = 2.5
TINY_BIG = ["--encoder-layers", "2", "--decoder-layers", "3", "--encoder-embed-dim", "32",
            "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
            "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--share-decoder-input-output-embed", "--decoder-learned-pos"]
TINY_SMALL = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
              "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "32",
              "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
              "--share-decoder-input-output-embed"]
UNTIED_BIG = [a for a in TINY_BIG if a not in ("--share-decoder-input-output-embed", "--decoder-learned-pos")]
UNTIED_SMALL = [a for a in TINY_SMALL if a != "--share-decoder-input-output-embed"]
#: the decoder forms the plugin supports (README), as fairseq arguments
DECODERS = {
    "post-norm, tied, learned positions": TINY_BIG,
    "pre-norm, untied, sinusoidal positions": UNTIED_BIG + ["--decoder-normalize-before", "--encoder-normalize-before"],
    "layernorm_embedding, unscaled, project out": UNTIED_SMALL + [
        "--layernorm-embedding", "--no-scale-embedding", "--decoder-output-dim", "24"],
}


def prepare_slice(corpus: str, out: Path, limit: int = 300) -> Path:
    """Run the real preparation recipe on the first ``limit`` lines of each split."""
    from data.corpora import CORPORA
    from data.prepare import prepare

    prepare(CORPORA[corpus], out, limit=limit, workers=1)
    return out


def random_model(bin_dir: Path, arch_args: list[str], seed: int, extra: list[str] = ()):
    """A randomly initialised ``transformer`` for ``bin_dir``'s dictionaries, made sharp enough
    that greedy outputs vary; returns (model, parsed args)."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    torch.manual_seed(seed)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(bin_dir), "--arch", "transformer", "--task", "translation", *arch_args, *extra]
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    with torch.no_grad():  # sharper, context-dependent distributions, so greedy outputs vary
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2 and "embed" not in name:
                p.mul_(0.5 if "encoder_attn" in name else WEIGHT_SCALE)
            if "embed_positions" in name:
                p.mul_(POSITION_SCALE)
        # make EOS a frequent enough argmax that hypotheses end at varied lengths
        eos = task.target_dictionary.eos()
        model.decoder.embed_tokens.weight[eos].mul_(EOS_SCALE)
        if model.decoder.output_projection.weight is not model.decoder.embed_tokens.weight:  # untied
            model.decoder.output_projection.weight[eos].mul_(EOS_SCALE)
    return model.eval(), args


def with_project_in(model, width: int = 24):
    """``model`` with narrower embeddings projected up to the decoder's width (``project_in_dim``):
    the one decoder form no fairseq option builds for a translation transformer, made by surgery."""
    d = model.decoder
    torch.manual_seed(width)
    d.embed_tokens = torch.nn.Embedding(d.embed_tokens.num_embeddings, width, padding_idx=d.padding_idx)
    torch.nn.init.normal_(d.embed_tokens.weight, 0, width ** -0.5)
    d.project_in_dim = torch.nn.Linear(width, d.embed_dim, bias=False)
    return model.eval()


def random_checkpoint(bin_dir: Path, arch_args: list[str], path: Path, seed: int, extra: list[str] = ()) -> Path:
    """A random model (``random_model``) saved as an inference checkpoint (what a trained model
    looks like to the loader)."""
    model, args = random_model(bin_dir, arch_args, seed, extra)
    torch.save(inference_state({"args": None, "model": args, "task": {"_name": "translation", "data": str(bin_dir)}},
                               model.state_dict(), fp16=False), path)
    return path


def make_tiny_pair(prepared: Path, out: Path, task: str = "translation", seed: int = 0,
                   max_source_tokens: int | None = None) -> Path:
    """A complete pair directory (random big + small, real dictionaries and BPE codes)."""
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = prepared / "bin"
    dicts = sorted(p.name for p in bin_dir.glob("dict.*.txt"))
    for name in dicts:
        shutil.copy(bin_dir / name, out / name)
    shutil.copy(prepared / "bpe.codes", out / "bpe.codes")
    src, tgt = ("src", "tgt") if task == "summarization" else ("de", "en")
    random_checkpoint(bin_dir, TINY_BIG, out / "big.pt", seed)
    random_checkpoint(bin_dir, TINY_SMALL, out / "small.pt", seed + 1000)
    spec = PairSpec(directory=out, task=task, source_lang=src, target_lang=tgt,
                    moses_source_lang="en" if task == "summarization" else "de", moses_target_lang="en",
                    max_source_tokens=max_source_tokens,
                    bild={"fallback_threshold": 0.6, "rollback_threshold": 5.0, "max_small_steps": 10},
                    generation={"max_len_a": 0, "max_len_b": 30})
    spec.save()
    return out


def corpus_lines(name: str, n: int = 200) -> list[str]:
    """The first ``n`` lines of a shipped corpus file (data/corpora/NAME)."""
    from jobs.shards import read_lines

    return read_lines(ROOT / "data" / "corpora" / name, n)


def sentencepiece_checkpoints(out: Path, lines: int = 300, vocab_size: int = 400) -> Path:
    """What a SentencePiece user brings: a joint SentencePiece model trained here on the de-en
    slice (``spm.model``), the joined fairseq dictionaries of its pieces (``dicts/dict.{de,en}.txt``)
    and random big and small checkpoints over them (``big.pt``, ``small.pt``)."""
    import sentencepiece
    from fairseq.data import Dictionary

    text = corpus_lines("lohelp.de-en.train.de.xz", lines) + corpus_lines("lohelp.de-en.train.en.xz", lines)
    out.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(out / "spm"),
                                             vocab_size=vocab_size, character_coverage=1.0, num_threads=1,
                                             minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "spm.model"))
    dictionary = Dictionary()
    for line in text:
        for piece in sp.encode(line, out_type=str):
            dictionary.add_symbol(piece)
    dictionary.finalize()
    (out / "dicts").mkdir(exist_ok=True)
    for lang in ("de", "en"):
        dictionary.save(str(out / "dicts" / f"dict.{lang}.txt"))
    langs = ["--source-lang", "de", "--target-lang", "en"]
    random_checkpoint(out / "dicts", TINY_BIG, out / "big.pt", seed=3, extra=langs)
    random_checkpoint(out / "dicts", TINY_SMALL, out / "small.pt", seed=1003, extra=langs)
    return out
