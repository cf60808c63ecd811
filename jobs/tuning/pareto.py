"""Speed/quality trade-off of a threshold sweep: the Pareto frontier, the recommendation, the plot."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Point:
    name: str
    kind: str  # "big" | "small" | "exact" | "bild"
    speedup: float  # over the big model's greedy decoding, same run
    quality: float


def frontier(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both axes (at least as fast and at least as good, and
    better on one), fastest first."""
    def dominated(p: Point) -> bool:
        return any(q.speedup >= p.speedup and q.quality >= p.quality and (q.speedup, q.quality) != (p.speedup, p.quality)
                   for q in points)

    return sorted((p for p in points if not dominated(p)), key=lambda p: (-p.speedup, -p.quality, p.name))


def recommend(points: Sequence[Point], big_quality: float, max_drop: float) -> Point:
    """The fastest point whose quality is within ``max_drop`` of the big model's (ties: better
    quality). The big model itself always qualifies, so there is always an answer."""
    eligible = [p for p in points if p.quality >= big_quality - max_drop]
    return min(eligible, key=lambda p: (-p.speedup, -p.quality, p.name))


def plot(points: Sequence[Point], recommended: Point, big_quality: float, max_drop: float, metric: str,
         title: str, path: Path) -> None:
    """quality vs speedup: every point, the frontier as a line, big/small/exact/recommended marked."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger verbose
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    grid = [p for p in points if p.kind == "bild"]
    ax.scatter([p.speedup for p in grid], [p.quality for p in grid], c="0.6", s=22, label="BiLD thresholds")
    front = sorted(frontier(points), key=lambda p: p.speedup)
    ax.plot([p.speedup for p in front], [p.quality for p in front], "-o", c="tab:red", ms=5, lw=1.5,
            label="Pareto frontier")
    for p in front:
        if p.kind == "bild":
            ax.annotate(p.name, (p.speedup, p.quality), textcoords="offset points", xytext=(4, 4), fontsize=7)
    marks = {"big": ("*", "black", "big model (greedy)"), "small": ("^", "tab:blue", "small model (greedy)"),
             "exact": ("D", "tab:green", "BiLD exact")}
    for p in points:
        if p.kind in marks:
            marker, color, label = marks[p.kind]
            ax.scatter([p.speedup], [p.quality], marker=marker, c=color, s=120, zorder=3, label=label)
    ax.scatter([recommended.speedup], [recommended.quality], s=320, facecolors="none", edgecolors="tab:orange",
               linewidths=2, zorder=4, label=f"recommended: {recommended.name}")
    ax.axhline(big_quality - max_drop, ls="--", c="tab:orange", lw=1, label=f"big {metric} − {max_drop:g}")
    ax.set_xlabel("speedup over the big model's greedy decoding (×)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
