"""Raw text -> a fairseq data directory (DATA_BIN) encoded exactly as a pair's models were trained.

`fairseq-generate --bild` reads binarized data. Making it with generic tools goes wrong quietly:
the `sacremoses` command line and fairseq's `--tokenizer moses` XML-escape quotes and ampersands
(`&quot;`), which the shipped models never saw. This uses the pair's own text pipeline (the one
`bild-jobs run` and `PairTranslator` use) and the pair's dictionaries.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from bild_fairseq.pairdir import PairSpec
from jobs.commands import run_logged


#: in a DATA_BIN this command made: the files it wrote there, the only ones a rerun may replace
MARKER = ".bild-binarize.json"


class BinarizeError(ValueError):
    """The output directory holds files this command did not write; nothing was deleted."""


def binarize(spec: PairSpec, splits: dict[str, tuple[list[str], list[str] | None]], destdir: Path,
             scratch: Path) -> Path:
    """Tokenize and BPE-encode each split's (sources, targets or None) with the pair's pipeline
    into ``scratch``, then ``fairseq-preprocess`` them into ``destdir`` with the pair's
    dictionaries (source only when no split has targets). Every line is kept, empty ones too."""
    clear_earlier_output(destdir)
    pipeline = spec.text_pipeline()
    scratch.mkdir(parents=True, exist_ok=True)
    only_source = all(targets is None for _, targets in splits.values())
    prefixes = []
    for split, (sources, targets) in splits.items():
        _write(scratch / f"{split}.{spec.source_lang}", [pipeline.encode(s) for s in sources])
        if targets is not None:
            _write(scratch / f"{split}.{spec.target_lang}", [pipeline.encode(t, target=True) for t in targets])
        prefixes += [f"--{split}pref", str(scratch / split)]
    destdir.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in destdir.iterdir()}
    dicts = {lang: spec.directory / f"dict.{lang}.txt" for lang in (spec.source_lang, spec.target_lang)}
    run_logged(["fairseq-preprocess", "--source-lang", spec.source_lang, "--target-lang", spec.target_lang,
                *prefixes, "--destdir", str(destdir), "--srcdict", str(dicts[spec.source_lang]),
                *(["--only-source"] if only_source else ["--tgtdict", str(dicts[spec.target_lang])]),
                "--workers", "1"], scratch / "preprocess.log", "fairseq-preprocess")
    if only_source:  # fairseq-generate loads both dictionaries from DATA_BIN
        shutil.copy(dicts[spec.target_lang], destdir / f"dict.{spec.target_lang}.txt")
    written = sorted({p.name for p in destdir.iterdir()} - before)
    (destdir / MARKER).write_text(json.dumps({"files": written}, indent=1) + "\n", encoding="utf-8")
    return destdir


def clear_earlier_output(destdir: Path) -> None:
    """Delete what an earlier run of this command wrote in ``destdir`` (its marker lists it), and
    nothing else: a directory the user filled (``--out .``, ``--out ~/data``) is refused."""
    if not destdir.exists():
        return
    if not destdir.is_dir():
        raise BinarizeError(f"--out {destdir} is a file: give a new or empty directory")
    marker = destdir / MARKER
    if not marker.is_file():
        if any(destdir.iterdir()):
            raise BinarizeError(f"--out {destdir} is not empty and was not made by bild-jobs binarize: "
                                "give a new or empty directory (nothing was deleted)")
        return
    try:
        names = json.loads(marker.read_text(encoding="utf-8"))["files"]
        if not isinstance(names, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise BinarizeError(f"{marker} is damaged: delete the files of {destdir} you no longer need, "
                            "and the marker, yourself") from None
    for name in names:
        if Path(name).name == name:  # a plain file name: never a path out of destdir
            (destdir / name).unlink(missing_ok=True)
    marker.unlink()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
