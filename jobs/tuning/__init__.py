"""Evaluation and tuning tools built on the runner: ``bild-jobs bench`` (``bench`` times variants
through ``measure``, adds peak memory from ``peakmem``, agreement from ``agreement``, CTranslate2
rows from ``peers``, and ``benchreport`` renders the tables with ``targets``' checks), ``bild-jobs
sweep`` (``sweep``, frontier and plot in ``pareto``), ``bild-jobs distill`` (``distill``: the big
model's outputs through the runner, then ``fairseq-train``) and ``costs`` (per-step accounting for
BENCHMARKS.md). They import the runner (``jobs``) and the plugin (``bild_fairseq``); nothing in
those imports them back.
"""
