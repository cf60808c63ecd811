"""The speed targets of the open issues (the lean engine, batched BiLD), checked on a suite's
benchmark result, so that a missed target reads MISSED in the generated table instead of being
rounded away.

Ratios are medians of the same run, on the same machine, at the same batching. Quality is
compared with the big model's at the same batching.
"""
from __future__ import annotations

QUALITY = {"translation": "BLEU", "summarization": "ROUGE-L"}
EXACT_VS_STOCK_B1 = 1.8
LOSSY_VS_STOCK_B1 = 2.5
BIG_LOOP_VS_STOCK_B1 = 1.5
LOSSY_VS_STOCK_BATCHED = 1.3
EXACT_VS_STOCK_BATCHED = 1.0
LOSSY_MAX_DROP = 0.5
BATCHED = ("batch 16", "max-tokens 4096")


def _target(text: str, variant: str, value: str, passed: bool | None) -> dict:
    return {"target": text, "variant": variant, "measured": value, "passed": passed}


def _ratio(rows: dict, batching: str, variant: str, base: str) -> float | None:
    """How many times faster ``variant`` is than ``base`` (a variant name) at ``batching``."""
    row, other = rows.get((batching, variant)), rows.get((batching, base))
    return None if row is None or other is None else other["median_seconds"] / row["median_seconds"]


def _faster(rows: dict, batching: str, variant: str, base: str, minimum: float, text: str,
            metric: str | None = None) -> dict:
    """``variant`` >= ``minimum`` x ``base``; with ``metric``, also within LOSSY_MAX_DROP of big."""
    x = _ratio(rows, batching, variant, base)
    if x is None or (metric and (batching, "big") not in rows):
        return _target(text, variant, f"{batching}: {variant}, {base} or big not measured", None)
    if not metric:
        return _target(text, variant, f"{x:.2f}x", x >= minimum)
    drop = rows[(batching, "big")]["scores"][metric] - rows[(batching, variant)]["scores"][metric]
    return _target(text, variant, f"{x:.2f}x, {metric} {-drop:+.2f}", x >= minimum and drop <= LOSSY_MAX_DROP)


def check(suite: dict) -> list[dict]:
    """Every target for every BiLD variant (and the big loop) of one suite's result."""
    rows = {(r["batching"], r["variant"]): r for r in suite["rows"]}
    metric = QUALITY[suite["task"]]
    batchings = list(dict.fromkeys(r["batching"] for r in suite["rows"]))
    peers = {v["compute_type"]: v["name"] for v in suite["variants"] if v["mode"] == "ct2"}
    out = [_faster(rows, "batch 1", "big", "stock", BIG_LOOP_VS_STOCK_B1,
                   f"project's big loop >= {BIG_LOOP_VS_STOCK_B1}x stock at batch 1")]
    for v in (v for v in suite["variants"] if v["mode"] == "bild"):
        name = v["name"]
        if v["exact"]:
            same = [rows[(b, name)]["same_as_stock"] for b in batchings]
            out.append(_target("output identical to stock, every batching", name,
                               f"{min(same)}/{suite['lines']} lines", min(same) == suite["lines"]))
            out.append(_faster(rows, "batch 1", name, "stock", EXACT_VS_STOCK_B1,
                               f"exact: >= {EXACT_VS_STOCK_B1}x stock at batch 1"))
            out += [_faster(rows, b, name, "stock", EXACT_VS_STOCK_BATCHED,
                            f"exact: >= {EXACT_VS_STOCK_BATCHED}x stock at {b}") for b in BATCHED]
            peer, kind = peers.get("float32"), "faster than CTranslate2 fp32"
        else:
            out.append(_faster(rows, "batch 1", name, "stock", LOSSY_VS_STOCK_B1,
                               f"lossy: >= {LOSSY_VS_STOCK_B1}x stock at batch 1, {metric} within "
                               f"{LOSSY_MAX_DROP} of big", metric))
            out += [_faster(rows, b, name, "stock", LOSSY_VS_STOCK_BATCHED,
                            f"lossy: >= {LOSSY_VS_STOCK_BATCHED}x stock at {b}, {metric} within "
                            f"{LOSSY_MAX_DROP} of big", metric) for b in BATCHED]
            peer, kind = peers.get("int8"), "faster than CTranslate2 int8 (the line to aim past)"
        if peer:
            out += [_faster(rows, b, name, peer, 1.0, f"{kind} at {b}") for b in batchings]
    return out
