"""``bild-jobs sweep``: points, plot and recommendation on a tiny pair; the frontier and the
recommendation rules on hand-made points."""
from __future__ import annotations

import csv
import json

import matplotlib.image
import pytest
from click.testing import CliRunner

from bench_fixtures import write_lines
from jobs.tuning.pareto import Point, frontier, recommend
from jobs.tuning.sweep import sweep_command

pytest_plugins = ["jobs_fixtures", "bench_fixtures"]


@pytest.fixture(scope="module")
def swept(active_pair, tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    src = write_lines(d / "dev.de", "lohelp.de-en.valid.de.xz", 10)
    ref = write_lines(d / "dev.en", "lohelp.de-en.valid.en.xz", 10)
    out = CliRunner().invoke(sweep_command, [
        "--pair", str(active_pair), "--input", str(src), "--ref", str(ref), "--out", str(d / "out"),
        "--fallback", "0,0.3", "--rollback", "0.5,4", "--max-small-steps", "2,6", "--metric", "chrF",
        "--max-quality-drop", "0"])
    assert out.exit_code == 0, out.output + out.stderr + repr(out.exception)
    with open(d / "out" / "points.csv", newline="") as f:
        points = list(csv.DictReader(f))
    return d / "out", points, out.stdout


def test_points_cover_baselines_exact_and_the_whole_grid(swept):
    _, points, _ = swept
    assert [p["name"] for p in points[:3]] == ["big", "small", "exact"]
    assert {p["name"] for p in points[3:]} == {f"fb{f}-rb{r}-s{s}" for f in ("0", "0.3") for r in ("0.5", "4")
                                               for s in ("2", "6")}
    big = points[0]
    assert float(big["speedup"]) == 1.0 and big["fallback_threshold"] == ""
    for p in points:
        assert float(p["seconds"]) > 0 and float(p["quality"]) == float(p["chrF"]) and p["BLEU"] != ""
    exact = points[2]
    assert exact["chrF"] == big["chrF"] and exact["BLEU"] == big["BLEU"]  # exact mode = the big model's output
    eager = next(p for p in points if p["name"] == "fb0-rb4-s6")
    assert float(eager["big_token_share"]) < 1 and float(eager["fallback_rate"]) < 1


def test_the_csv_flags_and_the_recommended_commands_come_from_the_rules(swept):
    """Wiring only: the rules themselves are checked on hand-made points below. The CSV's pareto
    and recommended columns are what ``frontier``/``recommend`` say of the CSV's own points, and
    the printed commands decode like the recommended point."""
    out, points, stdout = swept
    rec = json.loads((out / "recommendation.json").read_text())
    measured = [Point(p["name"], p["kind"], float(p["speedup"]), float(p["quality"])) for p in points]
    best = recommend(measured, measured[0].quality, rec["max_quality_drop"])
    assert rec["point"] == best.name and rec["max_quality_drop"] == 0
    assert [p["name"] for p in points if p["recommended"] == "True"] == [best.name]
    assert {p["name"] for p in points if p["pareto"] == "True"} == {p.name for p in frontier(measured)}
    chosen = next(p for p in points if p["name"] == best.name)
    assert rec["run_command"] in stdout and rec["generate_command"] in stdout
    assert chosen["run_flags"] in rec["run_command"]


def test_plot_is_a_real_png(swept):
    out, _, _ = swept
    image = matplotlib.image.imread(out / "sweep.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
    assert image.std() > 0.01  # something is drawn


def test_frontier_and_recommendation_rules():
    big, small = Point("big", "big", 1.0, 30.0), Point("small", "small", 4.0, 20.0)
    a, b, c = Point("a", "bild", 2.0, 29.8), Point("b", "bild", 2.5, 29.0), Point("c", "bild", 1.8, 29.5)
    points = [big, small, a, b, c]
    assert frontier(points) == [small, b, a, big]  # c: a is faster and better
    assert recommend(points, 30.0, 0.5) == a
    assert recommend(points, 30.0, 1.0) == b
    assert recommend(points, 30.0, 0.0) == big  # nothing else keeps the big model's quality
    assert recommend(points, 30.0, 15.0) == small


def _tiny_sweep(pair, tmp_path, *options: str):
    src = write_lines(tmp_path / "d.de", "lohelp.de-en.valid.de.xz", 2)
    ref = write_lines(tmp_path / "d.en", "lohelp.de-en.valid.en.xz", 2)
    return CliRunner().invoke(sweep_command, ["--pair", str(pair), "--input", str(src), "--ref", str(ref),
                                              "--out", str(tmp_path / "o"), "--rollback", "2", *options])


@pytest.mark.parametrize("options,message", [
    (["--fallback", "0.5", "--metric", "ROUGE-L"], "the translation metrics are ['BLEU', 'chrF']"),
    (["--fallback", "1.5"], "must be in [0, 1]"),
])
def test_sweep_refuses_bad_options_clearly(active_pair, tmp_path, options, message):
    out = _tiny_sweep(active_pair, tmp_path, *options)
    assert out.exit_code != 0 and message in out.stderr and "Traceback" not in out.output
