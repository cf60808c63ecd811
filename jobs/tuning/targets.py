"""The speed targets of the open issues (the lean engine, batched BiLD, the fast engine), checked on a suite's
benchmark result, so that a missed target reads MISSED in the generated table instead of being
rounded away.

Ratios are medians of the same run, on the same machine, at the same batching. Quality is
compared with the big model's at the same batching.
"""
from __future__ import annotations

from bild_fairseq.scoring import PRIMARY_METRIC
from jobs.tuning.measure import engine_tag

EXACT_VS_STOCK_B1 = 1.8
LOSSY_VS_STOCK_B1 = 2.5
BIG_LOOP_VS_STOCK_B1 = 1.5
LOSSY_VS_STOCK_BATCHED = 1.3
EXACT_VS_STOCK_BATCHED = 1.0
LOSSY_MAX_DROP = 0.5
BATCHED = ("batch 16", "max-tokens 4096")
#: the fast engine (ONNX Runtime) against CTranslate2, batch 1
EXACT_VS_CT2_FP32_B1 = 1.3
SUMM_LOSSY_VS_CT2_INT8_B1 = 1.3


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
    metric = PRIMARY_METRIC[suite["task"]]
    batchings = list(dict.fromkeys(r["batching"] for r in suite["rows"]))
    peers = {v["compute_type"]: v["name"] for v in suite["variants"] if v["mode"] == "ct2"}
    out = [_faster(rows, "batch 1", "big", "stock", BIG_LOOP_VS_STOCK_B1,
                   f"project's big loop >= {BIG_LOOP_VS_STOCK_B1}x stock at batch 1")]
    for v in (v for v in suite["variants"] if v["mode"] == "bild"):
        name = v["name"]
        if v.get("engine", "torch") != "torch":
            if v["exact"]:  # exact on this engine: equal to the same engine's big-only greedy output
                same = [rows[(b, name)].get("same_as_big", -1) for b in batchings]
                out.append(_target(f"output identical to big{_tag(v)} (same engine), every batching", name,
                                   f"{min(same)}/{suite['lines']} lines", min(same) == suite["lines"]))
            continue
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
    return out + engine_targets(suite, rows, metric, peers)


def _tag(v: dict) -> str:
    return engine_tag(v.get("engine", "torch"), v.get("int8", False))


def engine_targets(suite: dict, rows: dict, metric: str, peers: dict) -> list[dict]:
    """The fast engine's targets: ONNX Runtime rows against CTranslate2 at batch 1 and batched,
    BiLD against the same engine's big-only loop."""
    ct2_fp32, ct2_int8 = peers.get("float32"), peers.get("int8")
    ort = [v for v in suite["variants"] if v.get("engine", "torch") == "onnxruntime"]
    if not ort or not ct2_fp32 or not ct2_int8:
        return []
    out = []
    if any(not v["int8"] for v in ort):
        out.append(_faster(rows, "batch 1", "big/ort", ct2_fp32, 1.0, "ORT fp32 big-only greedy >= 1.0x CTranslate2 fp32, batch 1"))
    if any(v["int8"] for v in ort):
        out.append(_faster(rows, "batch 1", "big/ort8", ct2_int8, 1.0, "ORT 8-bit big-only greedy >= 1.0x CTranslate2 int8, batch 1"))
    lossy_min = SUMM_LOSSY_VS_CT2_INT8_B1 if suite["task"] == "summarization" else 1.0
    for v in (v for v in ort if v["mode"] == "bild"):
        name = v["name"]
        if v["exact"] and not v["int8"]:
            out.append(_faster(rows, "batch 1", name, ct2_fp32, EXACT_VS_CT2_FP32_B1,
                               f"exact on ORT fp32 >= {EXACT_VS_CT2_FP32_B1}x CTranslate2 fp32, batch 1"))
        if not v["exact"] and v["int8"]:
            out.append(_faster(rows, "batch 1", name, ct2_int8, lossy_min,
                               f"lossy on ORT 8-bit >= {lossy_min}x CTranslate2 int8, batch 1, {metric} within "
                               f"{LOSSY_MAX_DROP} of the fp32 big model", metric))
        if not v["exact"]:
            out += [_faster(rows, b, name, "big" + _tag(v), 1.0, f"lossy >= 1.0x the same engine's big-only loop at {b}")
                    for b in BATCHED]
    for b in BATCHED:
        fastest = min((v["name"] for v in ort if (b, v["name"]) in rows and
                       (v["exact"] or v["mode"] == "big" or
                        rows[(b, "big")]["scores"][metric] - rows[(b, v["name"])]["scores"][metric] <= LOSSY_MAX_DROP)),
                      key=lambda n: rows[(b, n)]["median_seconds"], default=None)
        if fastest:
            out.append(_faster(rows, b, fastest, ct2_fp32, 1.0,
                               f"fastest ORT configuration (within {LOSSY_MAX_DROP} {metric}) >= 1.0x CTranslate2 fp32 at {b}"))
    return out
