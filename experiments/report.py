"""Tables and Pareto plots from a directory of evaluation runs.

    python -m experiments.evaluate -m +experiment=sampler_comparison      # writes multirun/sampler_comparison/<time>/
    python -m experiments.report multirun/sampler_comparison/<time>       # report.md, report.csv, pareto.png there
    python -m experiments.report multirun/... --out experiments/results/sampler_comparison

Reads every `results.jsonl` below the directory (one JSON object per line, as
`experiments.evaluate` writes them; the directory may also be a single file).
A line that is not a JSON object with the metric fields is reported on stderr
as `file:line: reason` and skipped, and listed again at the end of report.md.
Writes into `--out` (default: the directory itself):

* `report.md`: one row per run (sampler + its key settings, task, n, accuracy,
  mean / median NFE, tokens per forward, latency per sample, tokens/s), the
  Pareto-optimal runs marked, then accuracy per task and sampler;
* `report.csv`: the same rows with every field, the full sampler and decode
  settings as JSON;
* `pareto.png`: accuracy vs mean NFE and accuracy vs tokens/s, the Pareto front
  of each task drawn as a line through its optimal runs;
* `results.jsonl`: every valid line merged, each with the `run` directory it
  came from (only when `--out` is not the input directory). Re-running the
  report on that folder reproduces the table and the plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

from dllm.evaluation import atomic_file

REQUIRED = ("accuracy", "mean_nfe", "sampler")
NUMERIC = ("accuracy", "mean_nfe", "median_nfe", "tokens_per_forward", "latency_per_sample_s", "tokens_per_s")
# Settings printed next to a sampler's name even when they do not vary; any other
# field is printed when its value differs between runs of the same sampler.
KEY_SETTINGS = {
    "low_confidence": ("steps", "remasking"),
    "threshold": ("tau", "confidence"),
    "factor": ("factor",),
    "credit": ("tau", "alpha"),
    "early_commit": ("gap",),
    "adaptive_block": ("delimiter_threshold",),
}
COLUMNS = ("sampler", "settings", "task", "n", "accuracy", "mean_nfe", "median_nfe", "tokens_per_forward",
           "latency_per_sample_s", "tokens_per_s", "pareto_nfe", "pareto_tokens_per_s", "run")


# ----------------------------------------------------------------- reading


def find_result_files(root: Path) -> list[Path]:
    """`root` itself if it is a file, else every results.jsonl below it, in path order."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such results directory or file")
    return sorted(root.rglob("results.jsonl"))


def read_results(root: Path | str) -> tuple[list[dict], list[str]]:
    """(records, problems): the valid lines below `root` and one 'file:line: reason' per skipped line.

    Each record gains `run`, the directory of its file relative to `root`, unless
    it already has one (a merged file). Records that repeat exactly (a merged file
    read together with the run directories it came from) are kept once.
    """
    root = Path(root)
    records, problems, seen = [], [], set()
    for path in find_result_files(root):
        run = str(path.parent.relative_to(root)) if root.is_dir() else str(path.parent)
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: malformed JSON ({error.msg} at column {error.colno}); line skipped")
                continue
            if not isinstance(record, dict):
                problems.append(f"{where}: a {type(record).__name__}, not a JSON object; line skipped")
                continue
            missing = [k for k in REQUIRED if k not in record]
            if missing:
                problems.append(f"{where}: missing field(s) {', '.join(missing)}; line skipped")
                continue
            if not isinstance(record["sampler"], dict) or "name" not in record["sampler"]:
                problems.append(f"{where}: 'sampler' is not a settings object with a 'name'; line skipped")
                continue
            not_numbers = [f"{k}={record[k]!r}" for k in NUMERIC if k in record and record[k] is not None
                           and (isinstance(record[k], bool) or not isinstance(record[k], (int, float)))]
            if not_numbers:
                problems.append(f"{where}: {', '.join(not_numbers)} must be numbers; line skipped")
                continue
            record.setdefault("run", run)
            key = json.dumps(record, sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            records.append(record)
    for problem in problems:
        print(problem, file=sys.stderr)
    return records, problems


# ----------------------------------------------------------------- labels


def sampler_name(settings: dict) -> str:
    """'adaptive_block(threshold)': the sampler's name, wrapped samplers inside."""
    inner = settings.get("inner")
    name = str(settings.get("name", "?"))
    return f"{name}({sampler_name(inner)})" if isinstance(inner, dict) else name


def flatten(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if key == "name":
            continue
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


def settings_labels(records: Sequence[dict], *, key_settings: bool = True) -> list[str]:
    """Per record: its key settings (if `key_settings`) plus every setting that varies among runs of
    the same sampler, and decode settings that vary across all runs (as `decode.<field>`)."""
    flat = [flatten(r["sampler"]) for r in records]
    names = [sampler_name(r["sampler"]) for r in records]
    decodes = [flatten(r.get("decode") or {}, "decode.") for r in records]
    varying_decode = sorted({k for d in decodes for k in d if len({_short(e.get(k)) for e in decodes}) > 1})
    labels = []
    for i, record in enumerate(records):
        same = [flat[j] for j in range(len(records)) if names[j] == names[i]]
        keys = [k for k in flat[i] if len({_short(f.get(k)) for f in same}) > 1]
        chain, settings = [], record["sampler"]
        while isinstance(settings, dict):  # key settings of the sampler and every wrapped one
            chain.append(settings)
            settings = settings.get("inner")
        prefix = ""
        for level in chain if key_settings else ():
            for k in KEY_SETTINGS.get(level.get("name"), ()):
                if flat[i].get(prefix + k) is not None and prefix + k not in keys:
                    keys.append(prefix + k)
            prefix += "inner."
        keys = sorted(set(keys), key=lambda k: (k.count("."), k))
        parts = [f"{k}={_short(flat[i][k])}" for k in keys] + [f"{k}={_short(decodes[i].get(k))}" for k in varying_decode]
        labels.append(" ".join(parts))
    return labels


# ----------------------------------------------------------------- Pareto


def pareto_front(points: Sequence[tuple[float, float]], *, minimize_x: bool) -> list[bool]:
    """Which points are Pareto optimal: higher y is better; lower x if `minimize_x`, else higher x.

    A point is dominated when another is at least as good on both axes and
    strictly better on one. Points with NaN coordinates are never optimal.
    """
    sign = -1.0 if minimize_x else 1.0
    xs = [sign * x for x, _ in points]
    ys = [y for _, y in points]
    optimal = []
    for i in range(len(points)):
        if math.isnan(xs[i]) or math.isnan(ys[i]):
            optimal.append(False)
            continue
        dominated = any(
            xs[j] >= xs[i] and ys[j] >= ys[i] and (xs[j] > xs[i] or ys[j] > ys[i])
            for j in range(len(points)) if j != i and not (math.isnan(xs[j]) or math.isnan(ys[j]))
        )
        optimal.append(not dominated)
    return optimal


# ----------------------------------------------------------------- tables


def _number(record: dict, key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def build_rows(records: Sequence[dict]) -> list[dict]:
    """One table row per record, sorted by task, then mean NFE; Pareto flags within each task."""
    labels = settings_labels(records)
    varying = settings_labels(records, key_settings=False)
    rows = []
    for record, label, short in zip(records, labels, varying):
        rows.append({
            "sampler": sampler_name(record["sampler"]), "settings": label, "varying": short,
            "task": str(record.get("task", "?")),
            "n": record.get("n"),
            **{k: _number(record, k) for k in ("accuracy", "mean_nfe", "median_nfe", "tokens_per_forward",
                                               "latency_per_sample_s", "tokens_per_s")},
            "run": record.get("run", ""), "record": record,
        })
    for task in {r["task"] for r in rows}:
        group = [r for r in rows if r["task"] == task]
        for flag, key, minimize in (("pareto_nfe", "mean_nfe", True), ("pareto_tokens_per_s", "tokens_per_s", False)):
            for row, optimal in zip(group, pareto_front([(r[key], r["accuracy"]) for r in group], minimize_x=minimize)):
                row[flag] = optimal
    rows.sort(key=lambda r: (r["task"], r["mean_nfe"], -r["accuracy"], r["sampler"], r["settings"]))
    return rows


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        extra = ("model", "split", "device_kind", "jax", "sampler_settings", "decode")
        writer.writerow(COLUMNS + extra)
        for row in rows:
            record = row["record"]
            writer.writerow([_fmt(row[c], 6) if isinstance(row[c], float) else row[c] for c in COLUMNS] + [
                record.get("model", ""), record.get("split", ""), record.get("device_kind", ""), record.get("jax", ""),
                json.dumps(record["sampler"], sort_keys=True), json.dumps(record.get("decode"), sort_keys=True),
            ])


def markdown(rows: Sequence[dict], problems: Sequence[str], source: str) -> str:
    lines = [f"# Evaluation report: {source}", ""]
    models = sorted({str(r["record"].get("model", "?")) for r in rows})
    devices = sorted({f"{r['record'].get('device_kind', '?')} (jax {r['record'].get('jax', '?')})" for r in rows})
    lines += [f"{len(rows)} runs; model: {', '.join(models) or '-'}; device: {', '.join(devices) or '-'}.", "",
              "Pareto columns mark the runs no other run of the same task beats on both accuracy and mean NFE "
              "(lower is better), or on both accuracy and tokens/s (higher is better).", ""]
    header = ("sampler", "settings", "task", "n", "accuracy", "mean NFE", "median NFE", "tokens/forward",
              "latency/sample (ms)", "tokens/s", "Pareto NFE", "Pareto tok/s")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["sampler"], r["settings"] or "-", r["task"], _fmt(r["n"]), _fmt(r["accuracy"]),
                 _fmt(r["mean_nfe"], 2), _fmt(r["median_nfe"], 1), _fmt(r["tokens_per_forward"], 2),
                 _fmt(r["latency_per_sample_s"] * 1000, 1), _fmt(r["tokens_per_s"], 0),
                 _fmt(r["pareto_nfe"]), _fmt(r["pareto_tokens_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    per_task = [r for r in rows if isinstance(r["record"].get("per_task"), dict)]
    names = sorted({t for r in per_task for t in r["record"]["per_task"]})
    if names and any(len(r["record"]["per_task"]) > 1 for r in per_task):
        lines += ["", "## Accuracy / mean NFE per task", "",
                  "| sampler | settings | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in per_task:
            cells = []
            for name in names:
                t = r["record"]["per_task"].get(name)
                cells.append(f"{t['accuracy']:.2f} / {t['mean_nfe']:.1f}" if t else "-")
            lines.append(f"| {r['sampler']} | {r['settings'] or '-'} | " + " | ".join(cells) + " |")
    if problems:
        lines += ["", f"## Skipped lines ({len(problems)})", ""] + [f"- `{p}`" for p in problems]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------- plot


def place_labels(ax, points: Sequence[tuple[float, float]], texts: Sequence[str], fontsize: float = 6.5) -> None:
    """Annotates each point with its text, moving a label until it overlaps no earlier label and no point.

    Greedy, in display coordinates: candidate offsets around the point are tried
    in order, then further out; a label that had to move far gets a thin leader line.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_display = ax.transData.transform
    marker_boxes = []
    for x, y in points:
        px, py = to_display((x, y))
        marker_boxes.append((px - 5, py - 5, px + 5, py + 5))
    placed: list[tuple[float, float, float, float]] = []
    candidates = [(7, -4), (7, 6), (-7, -4), (-7, 6), (7, -14), (7, 16), (-7, -14), (-7, 16)]
    candidates += [(dx * k, dy * k) for k in (2, 3, 4) for dx, dy in candidates[:4]]

    def overlaps(box, others):
        return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)

    def annotate(text, xy, offset, **leader):
        return ax.annotate(text, xy, xytext=offset, textcoords="offset points", fontsize=fontsize,
                           ha="left" if offset[0] >= 0 else "right", va="center", alpha=0.9, **leader)

    order = sorted(range(len(points)), key=lambda i: -points[i][1])
    right_edge = ax.bbox.x1
    for i in order:
        (x, y), text = points[i], texts[i]
        best = None
        near_right = to_display((x, y))[0] > right_edge - 160  # try the left side first there
        for dx, dy in sorted(candidates, key=lambda c: c[0] > 0) if near_right else candidates:
            label = annotate(text, (x, y), (dx, dy))
            extent = label.get_window_extent(renderer)
            box = (extent.x0 - 1, extent.y0 - 1, extent.x1 + 1, extent.y1 + 1)
            others = placed + [m for j, m in enumerate(marker_boxes) if j != i]
            if not overlaps(box, others):
                best = (label, box, (dx, dy))
                break
            label.remove()
        if best is None:  # nowhere free: the first place, on top
            dx, dy = candidates[0]
            label = annotate(text, (x, y), (dx, dy))
            extent = label.get_window_extent(renderer)
            best = (label, (extent.x0, extent.y0, extent.x1, extent.y1), (dx, dy))
        label, box, (dx, dy) = best
        if abs(dx) > 10 or abs(dy) > 10:
            label.remove()
            annotate(text, (x, y), (dx, dy), arrowprops=dict(arrowstyle="-", color="gray", linewidth=0.5, alpha=0.7))
        placed.append(box)


def plot_pareto(rows: Sequence[dict], path: Path, title: str = "") -> None:
    """Two panels, accuracy vs mean NFE and accuracy vs tokens/s, both x axes logarithmic;
    one marker per run, labels placed so they do not collide; each task's front as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = sorted({r["sampler"] for r in rows})
    tasks = sorted({r["task"] for r in rows})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(samplers)}
    markers = {t: "osD^vP*X"[i % 8] for i, t in enumerate(tasks)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    panels = ((axes[0], "mean_nfe", "pareto_nfe", "mean NFE, forward passes per sample (log scale; lower is better)"),
              (axes[1], "tokens_per_s", "pareto_tokens_per_s", "tokens/s (log scale; higher is better)"))
    several = len(samplers) > 1
    to_label = []
    for ax, key, flag, xlabel in panels:
        shown = [r for r in rows if not (math.isnan(r[key]) or math.isnan(r["accuracy"])) and r[key] > 0]
        for r in shown:
            ax.scatter(r[key], r["accuracy"], color=colors[r["sampler"]], marker=markers[r["task"]], s=60,
                       edgecolors="black" if r[flag] else "none", linewidths=1.5, zorder=3)
        for task in tasks:
            front = sorted((r[key], r["accuracy"]) for r in shown if r["task"] == task and r[flag])
            if front:
                xs, ys = zip(*front)
                ax.plot(xs, ys, linestyle="--", color="black", linewidth=1, alpha=0.7, zorder=2)
        if shown:
            ax.set_xscale("log")
            xs = [r[key] for r in shown]
            ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
            ys = [r["accuracy"] for r in shown]
            pad = max(0.02, 0.08 * (max(ys) - min(ys)))
            ax.set_ylim(min(ys) - pad, max(ys) + pad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3, which="both")
        texts = [" ".join(t for t in ((r["sampler"] if several else ""), r["varying"]) if t) for r in shown]
        keep = [i for i, t in enumerate(texts) if t]
        to_label.append((ax, [(shown[i][key], shown[i]["accuracy"]) for i in keep], [texts[i] for i in keep]))
    handles = [plt.Line2D([], [], color=colors[s], marker="o", linestyle="", label=s) for s in samplers]
    if len(tasks) > 1:
        handles += [plt.Line2D([], [], color="gray", marker=markers[t], linestyle="", label=t) for t in tasks]
    handles += [plt.Line2D([], [], color="black", marker="o", markerfacecolor="none", markeredgewidth=1.5,
                           linestyle="--", linewidth=1, label="Pareto optimal / front")]
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle(textwrap.fill(title, 150) if title else "accuracy vs cost (black ring: Pareto optimal)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.canvas.draw()  # fixes the axes' transforms before the labels are placed
    for ax, points, texts in to_label:
        place_labels(ax, points, texts)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------- entry


def write_report(source: Path | str, out: Path | str | None = None, *, title: str = "") -> dict:
    """Reads `source`, writes report.md, report.csv, pareto.png (and a merged results.jsonl) into `out`."""
    source = Path(source)
    out = Path(out) if out is not None else (source if source.is_dir() else source.parent)
    records, problems = read_results(source)
    if not records:
        raise ValueError(f"{source}: no valid result lines in {len(find_result_files(source))} results.jsonl "
                         f"file(s) ({len(problems)} skipped)")
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(records)
    paths = {"markdown": out / "report.md", "csv": out / "report.csv", "plot": out / "pareto.png"}
    with atomic_file(paths["markdown"]) as tmp:
        tmp.write_text(markdown(rows, problems, title or str(source)))
    with atomic_file(paths["csv"]) as tmp:
        write_csv(rows, tmp)
    with atomic_file(paths["plot"]) as tmp:
        plot_pareto(rows, tmp, title)
    if out.resolve() != (source if source.is_dir() else source.parent).resolve():  # never into the source
        paths["merged"] = out / "results.jsonl"
        with atomic_file(paths["merged"]) as tmp:
            tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    return {"rows": rows, "problems": problems, "paths": paths}


def main(argv: Iterable[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a multirun directory (every results.jsonl below it) or one results.jsonl")
    parser.add_argument("--out", default=None, help="output folder (default: the source directory)")
    parser.add_argument("--title", default="", help="title of the report and the plot")
    args = parser.parse_args(list(argv) if argv is not None else None)
    result = write_report(args.source, args.out, title=args.title)
    print(Path(result["paths"]["markdown"]).read_text())
    for name, path in result["paths"].items():
        print(f"wrote {name}: {path}")
    if result["problems"]:
        print(f"{len(result['problems'])} line(s) skipped (listed above and in report.md)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
