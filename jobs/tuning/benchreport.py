"""The benchmark's JSON as markdown: run description, one table per suite, agreement, targets."""
from __future__ import annotations

from pathlib import Path

from bild_fairseq.scoring import METRICS
from jobs.tuning.targets import FILE_NAME, check

BEGIN = "<!-- bild-jobs bench: generated section, begin -->"
END = "<!-- bild-jobs bench: generated section, end -->"


def _num(value: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{suffix}"


def _pct(value: float | None) -> str:
    return _num(None if value is None else 100 * value, ".1f", "%")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _run_description(result: dict) -> list[str]:
    m = result["machine"]
    load = f"{m['load_average_start'][0]:.2f} at start, {m['load_average_end'][0]:.2f} at end"
    return [
        f"- command: `{result['command']}`",
        f"- started {result['started']}, {result['wall_seconds'] / 60:.1f} min in all; device `{result['device']}`, "
        f"{result.get('precision', 'fp32')}; "
        f"time = median of {result['repeats']} interleaved repeat(s) (min–max in brackets)",
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, fairseq {m['fairseq']}, Python {m['python']}; {m['platform']}",
        f"- 1-minute load average: {load}",
    ]


def _suite_table(suite: dict) -> list[str]:
    quality = list(METRICS[suite["task"]])
    header = ["batching", "variant", "time (s)", "sent/s", "tok/s", "× stock", "× big", *quality, "= stock",
              "= big (same engine)", "fallback", "rollback", "big tokens", "peak RSS (MiB)"]
    rows = []
    for r in suite["rows"]:
        memory = r.get("memory")
        rows.append([
            r["batching"], r["variant"], f"{r['median_seconds']:.2f} ({min(r['seconds']):.2f}–{max(r['seconds']):.2f})",
            f"{r['sentences_per_second']:.1f}", f"{r['tokens_per_second']:.0f}",
            _num(r["speedup_vs_stock"]), _num(r["speedup_vs_big"]), *(f"{r['scores'][q]:.2f}" for q in quality),
            f"{r['same_as_stock']}/{suite['lines']}" if "same_as_stock" in r else "—",
            f"{r['same_as_big']}/{suite['lines']}" if "same_as_big" in r else "—",
            _pct(r.get("fallback_rate")), _pct(r.get("rollback_rate")), _pct(r.get("big_token_share")),
            (f"{memory['peak_rss_mib']:.0f}" + (f" (CUDA {memory['peak_cuda_mib']:.0f})" if "peak_cuda_mib" in memory
                                                 else "")) if memory else "—",
        ])
    return _table(header, rows)


def _costs_tables(suite: dict) -> list[str]:
    """Model call costs per engine, and the loop's bookkeeping per iteration at batch 1."""
    out = []
    if suite.get("call_costs_ms"):
        labels = list(next(iter(suite["call_costs_ms"].values())))
        out += ["", f"Model call costs (ms per call, one sentence of {suite['call_costs_source_tokens']} source "
                    "tokens after a 20-token prefix; `forward k`: a k-token pass, BiLD's verification):", ""]
        out += _table(["engine, model", *labels], [[name, *(f"{row[k]:.3f}" for k in labels)]
                                                  for name, row in suite["call_costs_ms"].items()])
    for name, t in suite.get("differences", {}).items():
        out += ["", f"`{name}` vs `{t['reference']}` (first batching): {t['lines'] - t['differing']}/{t['lines']} lines "
                    f"identical; of the {t['differing']} that differ, {t['near_ties']} start at a near tie (the big "
                    f"model's two best log-probabilities within {t['margin']:g})"
                    + (f"; largest gap {t['largest_gap']:.2g}" if t["largest_gap"] is not None else "") + "."]
    if suite.get("loop_batch1"):
        out += ["", "Batch 1, one untimed-by-the-table pass: the loop's own bookkeeping between model calls "
                    "(state updates, policies, cache appends) per loop iteration, and host reads:", ""]
        out += _table(["variant", "iterations", "bookkeeping ms/iteration", "share of time", "host reads/iteration"],
                      [[name, str(x["iterations"]), f"{x['bookkeeping_ms_per_iteration']:.3f}",
                        _pct(x["bookkeeping_ms_per_iteration"] * x["iterations"]
                             / (x["bookkeeping_ms_per_iteration"] * x["iterations"] + x["model_ms"])),
                        f"{x['host_reads_per_iteration']:.2f}"] for name, x in suite["loop_batch1"].items()])
    return out


def render_suite(suite: dict, targets: dict | None = None) -> list[str]:
    models = ", ".join(f"`{name}` sha256 {digest}…" for name, digest in suite["model_sha256"].items())
    out = [f"### {suite['name']} ({suite['task']}): {suite['lines']} lines of `{Path(suite['source']).name}`, "
           f"pair `{suite['pair']}`", "", f"Models: {models}.", "", *_suite_table(suite), ""]
    out.append("Small-model agreement with the big model (share of the big model's greedy output tokens that "
               "are also the small model's argmax, same source and prefix): "
               + ", ".join(f"`{name}` {100 * a:.1f}%" for name, a in suite["agreement"].items()) + ".")
    out += [f"Note: {n}." for n in suite.get("notes", [])]
    out += _costs_tables(suite)
    out += ["", "Variants (`bild-jobs run` flags; pair.json: "
            + ", ".join(f"{k} {v}" for k, v in suite["pair_bild"].items()) + "):", ""]
    out += _table(["variant", "flags"], [[v["name"], "`" + " ".join(v["run_flags"]) + "`"] for v in suite["variants"]
                                         if v["mode"] != "stock"])
    if targets is None:
        return out + [""]
    out += ["", f"Targets ({FILE_NAME}):", ""]
    mark = {True: "met", False: "**MISSED**", None: "not measured"}
    out += _table(["target", "variant", "measured", ""],
                  [[t["target"], t["variant"], t["measured"], mark[t["passed"]]] for t in check(suite, targets)])
    return out + [""]


def render(result: dict) -> str:
    lines = _run_description(result) + [""]
    if result.get("targets") is None:
        lines += [f"No targets checked: no {FILE_NAME} next to the suites file.", ""]
    for suite in result["suites"]:
        lines += render_suite(suite, result.get("targets"))
    return "\n".join(lines)


def update_section(path: Path, markdown: str) -> None:
    """Put ``markdown`` between the generated-section markers of ``path`` (appended if absent),
    keeping everything written by hand around it."""
    block = f"{BEGIN}\n{markdown.rstrip()}\n{END}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text, encoding="utf-8")
