"""A tiny Hydra multirun on CPU (2 samplers x 2 thresholds on the tiny-tasks suite) and its report.

The sweep runs as a user would type it, in a subprocess:

    python -m experiments.evaluate -m sampler=threshold,credit sampler.tau=0.8,0.95 ...
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from experiments.common import REPO_ROOT
from experiments.report import main as report_main
from experiments.report import pareto_front, read_results, write_report


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("multirun")
    command = [sys.executable, "-m", "experiments.evaluate", "-m", "sampler=threshold,credit",
               "sampler.tau=0.8,0.95", "task.tasks=[copy,reverse]", "task.n_per_task=3", "batch_size=6",
               f"hydra.sweep.dir={root}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_multirun_writes_one_result_line_per_job(sweep_dir):
    files = sorted(sweep_dir.rglob("results.jsonl"))
    assert len(files) == 4
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted((r["sampler"]["name"], r["sampler"]["tau"]) for r in lines) == [
        ("credit", 0.8), ("credit", 0.95), ("threshold", 0.8), ("threshold", 0.95)]
    for r in lines:
        assert r["n"] == 6 and r["tasks"] == ["copy", "reverse"] and r["model"].endswith("tiny-tasks")
        assert 0 <= r["accuracy"] <= 1 and r["mean_nfe"] >= 1 and r["tokens_per_s"] > 0
        assert {"median_nfe", "tokens_per_forward", "latency_per_sample_s", "jax", "device_kind", "decode"} <= set(r)


def test_report_table_csv_and_plot(sweep_dir, tmp_path, capsys):
    # a malformed line and a line without metrics: both reported with file:line and skipped
    broken = sorted(sweep_dir.rglob("results.jsonl"))[0]
    original = broken.read_text()
    broken.write_text(original + '{"task": "suite", "accuracy": 0.5\n' + '{"task": "suite"}\n')
    try:
        out = tmp_path / "report"
        report_main([str(sweep_dir), "--out", str(out)])
    finally:
        broken.write_text(original)
    stderr = capsys.readouterr().err
    assert f"{broken}:2: malformed JSON" in stderr and f"{broken}:3: missing field(s)" in stderr

    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert sorted((r["sampler"], r["settings"]) for r in rows) == [
        ("credit", "alpha=0.65 tau=0.8"), ("credit", "alpha=0.65 tau=0.95"),
        ("threshold", "confidence=max_prob tau=0.8"), ("threshold", "confidence=max_prob tau=0.95")]
    for r in rows:
        assert r["task"] == "suite" and float(r["mean_nfe"]) >= 1 and float(r["tokens_per_s"]) > 0
        assert json.loads(r["sampler_settings"])["name"] == r["sampler"]
    assert any(r["pareto_nfe"] == "True" for r in rows) and any(r["pareto_tokens_per_s"] == "True" for r in rows)

    markdown = (out / "report.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| threshold") or line.startswith("| credit")]
    assert len(table) == 4 + 4  # the main table and the per-task table
    assert "Skipped lines (2)" in markdown and f"{broken}:2" in markdown

    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # the merged results.jsonl rebuilds the same table
    merged = out / "results.jsonl"
    assert len(merged.read_text().splitlines()) == 4
    again = write_report(merged, tmp_path / "again")
    assert [r["settings"] for r in again["rows"]] == [r["settings"] for r in write_report(sweep_dir, out)["rows"]]


def test_report_reads_merged_and_run_dirs_once(sweep_dir, tmp_path):
    write_report(sweep_dir, tmp_path / "merged")
    (sweep_dir / "merged").mkdir()
    try:
        (sweep_dir / "merged" / "results.jsonl").write_text((tmp_path / "merged" / "results.jsonl").read_text())
        records, problems = read_results(sweep_dir)
    finally:
        (sweep_dir / "merged" / "results.jsonl").unlink()
        (sweep_dir / "merged").rmdir()
    assert len(records) == 4 and problems == []


def test_report_without_results_fails_loudly(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="no valid result lines"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")


def test_pareto_front_by_hand():
    # (x, accuracy): lower x is better for NFE
    points = [(2.0, 0.9), (4.0, 0.95), (3.0, 0.8), (4.0, 0.95), (8.0, 0.95), (1.0, float("nan"))]
    assert pareto_front(points, minimize_x=True) == [True, True, False, True, False, False]
    # higher x is better for tokens/s
    assert pareto_front([(100, 0.9), (200, 0.8), (50, 0.95), (90, 0.85)], minimize_x=False) == [True, True, True,
                                                                                                    False]


def test_labels_of_crowded_points_do_not_collide():
    """Twelve runs within a few percent of each other (a threshold sweep): no two labels overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.report import place_labels

    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(16.8 + 0.2 * i, 0.21 + 0.004 * i) for i in range(12)]
    ax.scatter(*zip(*points))
    ax.set_xscale("log")
    fig.canvas.draw()
    place_labels(ax, points, [f"threshold tau={0.5 + 0.04 * i:.2f}" for i in range(12)])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 12
    overlapping = [(i, j) for i in range(12) for j in range(i) if boxes[i].overlaps(boxes[j])]
    plt.close(fig)
    assert not overlapping


def test_pareto_plot_uses_log_axes(sweep_dir, tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    write_report(sweep_dir, tmp_path, title="tiny-tasks, copy + reverse")
    (fig,) = saved
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "log"]
    assert fig._suptitle.get_text() == "tiny-tasks, copy + reverse"
