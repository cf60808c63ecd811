"""The speed targets BiLD must meet (issue 6), checked on a suite's benchmark result, so that a
missed target reads FAIL in the generated table instead of being rounded away.

Ratios are medians of the same run, on the same machine, at the same batching.
"""
from __future__ import annotations

QUALITY = {"translation": "BLEU", "summarization": "ROUGE-L"}
EXACT_VS_STOCK_B1 = 1.8
LOSSY_VS_STOCK_B1 = 2.5
LOSSY_MAX_DROP = 0.5
BILD_VS_GREEDY_B16 = 1.5


def _target(text: str, variant: str, value: str, passed: bool | None) -> dict:
    return {"target": text, "variant": variant, "measured": value, "passed": passed}


def _speedup(rows: dict, batching: str, variant: str, base: str, minimum: float, text: str,
             strict: bool = False) -> dict:
    row = rows.get((batching, variant))
    if row is None or row[f"speedup_vs_{base}"] is None:
        return _target(text, variant, f"{batching} or {base} not measured", None)
    x = row[f"speedup_vs_{base}"]
    return _target(text, variant, f"{x:.2f}x", x > minimum if strict else x >= minimum)


def check(suite: dict) -> list[dict]:
    """Every target for every BiLD variant of one suite's result."""
    rows = {(r["batching"], r["variant"]): r for r in suite["rows"]}
    metric = QUALITY[suite["task"]]
    batchings = list(dict.fromkeys(r["batching"] for r in suite["rows"]))
    out = []
    for v in (v for v in suite["variants"] if v["mode"] == "bild"):
        name = v["name"]
        if v["exact"]:
            same = [rows[(b, name)]["same_as_stock"] for b in batchings]
            out.append(_target("output identical to stock, every batching", name,
                               f"{min(same)}/{suite['lines']} lines", min(same) == suite["lines"]))
            out.append(_speedup(rows, "batch 1", name, "stock", EXACT_VS_STOCK_B1,
                                f"exact: >= {EXACT_VS_STOCK_B1}x stock at batch 1"))
        else:
            text = f"lossy: >= {LOSSY_VS_STOCK_B1}x stock at batch 1, {metric} within {LOSSY_MAX_DROP} of big"
            row, big = rows.get(("batch 1", name)), rows.get(("batch 1", "big"))
            if row is None or big is None or row["speedup_vs_stock"] is None:
                out.append(_target(text, name, "batch 1, stock or big not measured", None))
            else:
                drop = big["scores"][metric] - row["scores"][metric]
                out.append(_target(text, name, f"{row['speedup_vs_stock']:.2f}x, {metric} {-drop:+.2f}",
                                   row["speedup_vs_stock"] >= LOSSY_VS_STOCK_B1 and drop <= LOSSY_MAX_DROP))
        for base, label in (("stock", "stock greedy (1)"), ("big", "project's big greedy (2)")):
            out.append(_speedup(rows, "batch 16", name, base, BILD_VS_GREEDY_B16,
                                f">= {BILD_VS_GREEDY_B16}x {label} at batch 16"))
        out.append(_speedup(rows, "batch 1", name, "big", 1.0, "faster than the project's big greedy (2) at batch 1",
                            strict=True))
    return out
