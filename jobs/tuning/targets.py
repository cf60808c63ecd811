"""The targets of a benchmark run, checked on a suite's result, so that a missed target reads
MISSED in the generated table instead of being rounded away. The targets themselves are data
(``targets.json`` next to the suites file: its "about" says the format); this module only
reads them.

Ratios are medians of the same run, on the same machine, at the same batching. Quality is
compared with the torch big model's at the same batching.
"""
from __future__ import annotations

import json
from pathlib import Path

from bild_fairseq.scoring import PRIMARY_METRIC
from jobs.tuning.measure import MeasureError, engine_tag

FILE_NAME = "targets.json"


def load_targets(suites_file: Path) -> dict | None:
    """The targets next to ``suites_file`` (None when there is no such file)."""
    path = Path(suites_file).with_name(FILE_NAME)
    if not path.is_file():
        return None
    try:
        rules = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rules.get("targets"), list) or not isinstance(rules.get("quality_budget"), (int, float)):
            raise ValueError("expected an object with a 'targets' list and a 'quality_budget' number")
    except ValueError as e:
        raise MeasureError(f"{path}: {e}") from None
    return rules


def _target(text: str, variant: str, value: str, passed: bool | None) -> dict:
    return {"target": text, "variant": variant, "measured": value, "passed": passed}


def _selects(selector: dict, v: dict) -> bool:
    defaults = {"engine": "torch", "int8": False, "exact": False}
    return all(v.get(key, defaults.get(key)) == value for key, value in selector.items())


class _Suite:
    """One suite's rows and variants, and the target checks on them."""

    def __init__(self, suite: dict, budget: float):
        self.rows = {(r["batching"], r["variant"]): r for r in suite["rows"]}
        self.variants, self.lines, self.task = suite["variants"], suite["lines"], suite["task"]
        self.batchings = list(dict.fromkeys(r["batching"] for r in suite["rows"]))
        self.metric, self.budget = PRIMARY_METRIC[self.task], budget
        self.peers = {f"ct2 {v['compute_type']}": v["name"] for v in self.variants if v["mode"] == "ct2"}

    def base(self, name: str, v: dict) -> str | None:
        """The variant name a target's "vs"/"same_as" means for variant ``v`` (None: not run)."""
        if name == "big (same engine)":
            return "big" + engine_tag(v.get("engine", "torch"), v.get("int8", False))
        return self.peers.get(name) if name.startswith("ct2 ") else name

    def drop(self, batching: str, name: str) -> float:
        """How far ``name``'s quality is below the torch big model's at ``batching``."""
        return (self.rows[(batching, "big")]["scores"][self.metric]
                - self.rows[(batching, name)]["scores"][self.metric])

    def faster(self, text: str, name: str, base: str, batching: str, minimum: float, quality: bool) -> dict:
        row, other = self.rows.get((batching, name)), self.rows.get((batching, base))
        if row is None or other is None or (quality and (batching, "big") not in self.rows):
            return _target(text, name, f"{batching}: {name}, {base} or big not measured", None)
        x = other["median_seconds"] / row["median_seconds"]
        if not quality:
            return _target(text, name, f"{x:.2f}x", x >= minimum)
        drop = self.drop(batching, name)
        return _target(text, name, f"{x:.2f}x, {self.metric} {-drop:+.2f}", x >= minimum and drop <= self.budget)

    def fastest(self, selector: dict, batching: str) -> str | None:
        """The fastest selected variant at ``batching`` within the quality budget."""
        chosen = [v for v in self.variants if _selects(selector, v) and (batching, v["name"]) in self.rows
                  and (v.get("exact") or v["mode"] == "big" or self.drop(batching, v["name"]) <= self.budget)]
        return min((v["name"] for v in chosen), key=lambda n: self.rows[(batching, n)]["median_seconds"], default=None)

    def check(self, rule: dict) -> list[dict]:
        minimum = rule.get("min", 1.0)
        minimum = minimum[self.task] if isinstance(minimum, dict) else minimum
        batchings = self.batchings if rule.get("at", "every") == "every" else rule["at"]

        def text(v: dict, batching: str = "") -> str:
            return rule["target"].format(min=minimum, batching=batching, metric=self.metric, budget=self.budget,
                                         big=self.base("big (same engine)", v))
        out = []
        if "same_as" in rule:
            for v in (v for v in self.variants if _selects(rule["variants"], v)):
                key = "same_as_stock" if rule["same_as"] == "stock" else "same_as_big"
                same = [self.rows[(b, v["name"])].get(key, -1) for b in self.batchings if (b, v["name"]) in self.rows]
                out.append(_target(text(v), v["name"], f"{min(same, default=0)}/{self.lines} lines",
                                   bool(same) and min(same) == self.lines))
            return out
        if "fastest_of" in rule:
            for b in batchings:
                name = self.fastest(rule["fastest_of"], b)
                base = self.base(rule["vs"], {})
                if name and base:
                    out.append(self.faster(text({}, b), name, base, b, minimum, False))
            return out
        for v in (v for v in self.variants if _selects(rule["variants"], v)):
            base = self.base(rule["vs"], v)
            if base is not None:
                out += [self.faster(text(v, b), v["name"], base, b, minimum, rule.get("quality", False))
                        for b in batchings]
        return out


def check(suite: dict, rules: dict) -> list[dict]:
    """Every target of ``rules`` (a targets.json) on one suite's benchmark result."""
    checked = _Suite(suite, rules["quality_budget"])
    return [t for rule in rules["targets"] for t in checked.check(rule)]
