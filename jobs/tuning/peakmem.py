"""Peak memory of one decoding variant, in a fresh process that loads only that variant's models.

    python -m jobs.tuning.peakmem REQUEST.json        # prints one JSON line

Peak resident set size (Linux VmHWM) covers Python, torch, fairseq, the models and decoding; it
is reset (``/proc/self/clear_refs``) before each batching, which are decoded in the order given.
On a GPU, torch's peak allocated CUDA memory is reported as well.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

MIB = 1024


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: peak memory is measured on Linux only")
    return int(match.group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure_process(request: dict) -> dict:
    """Run in the fresh process: load, then decode every batching; MiB per batching name."""
    import torch

    from jobs.tuning.measure import Batching, PairModels, Variant, encode, generate, plan_batches

    if request.get("threads"):
        torch.set_num_threads(request["threads"])
    variant = Variant(**request["variant"])
    translator = PairModels(request["pair"], [variant], request["device"],
                            request["precision"]).translator(variant)
    sources = encode(translator, request["lines"])
    cuda = request["device"].startswith("cuda")
    loaded = _status_kib("VmRSS")
    out = {}
    for max_sentences, max_tokens in request["batchings"]:
        batching = Batching(max_sentences, max_tokens)
        _reset_peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for batch in plan_batches(sources, batching):
            generate(translator, [sources[i] for i in batch])
        out[batching.name] = {"peak_rss_mib": _status_kib("VmHWM") / MIB, "loaded_rss_mib": loaded / MIB}
        if cuda:
            out[batching.name]["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / MIB ** 2
    return out


def peak_memory(pair: str | Path, variant: dict, lines: list[str], batchings: list[tuple[int | None, int]],
                device: str, threads: int | None, scratch: Path, precision: str = "fp32") -> dict:
    """Run :func:`measure_process` in a subprocess; raise with its stderr if it fails."""
    request = {"pair": str(pair), "variant": variant, "lines": lines, "batchings": batchings,
               "device": device, "threads": threads, "precision": precision}
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "request.json"
    path.write_text(json.dumps(request), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "jobs.tuning.peakmem", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory run of {variant['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    print(json.dumps(measure_process(request)))


if __name__ == "__main__":
    main()
