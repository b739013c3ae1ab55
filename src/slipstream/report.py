"""The run report: one HTML page and a PNG per plot, drawn from a run's `metrics.jsonl`.

    slipstream report RUN_DIR        writes RUN_DIR/report/index.html and RUN_DIR/report/*.png

The launcher writes it at the end of every run (`report_at_end`: a report that cannot be drawn
costs one log line, never the run). Each plot reads the columns the trainer writes per step
(`services/trainer/metrics.py`): a plot whose columns hold no number in any row is left out and
the page says which columns it looked for, so a run without `--use-tis` reads "no IS weights"
rather than showing an empty frame. Columns named `eval/<name>/<metric>` get one plot per
`<name>`, whatever metrics it has.

The page is one self-contained file (the PNGs are embedded as data URIs, so it can be mailed or
attached to a ticket); the PNG files beside it are the same images, for slides and diffs. Drawing
uses matplotlib's object API on the Agg canvas (`Figure`, no `pyplot`): no display, no global
state, safe to call from any thread of any process.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
STYLES = ("-", "--", ":", "-.")
SMOOTH_OVER = 20  # with more steps than this, a line gets a moving average over its raw values


# ---- reading ---------------------------------------------------------------------------------


def read_rows(path: Path) -> tuple[list[Row], int]:
    """The JSON objects of `metrics.jsonl` and how many lines were unreadable (a cut-off last line)."""
    rows: list[Row] = []
    num_bad = 0
    try:
        text = path.read_text()
    except FileNotFoundError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            num_bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            num_bad += 1
    return rows, num_bad


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def series(rows: list[Row], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that hold a number under `key`."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        y = _number(row.get(key))
        if y is None:
            continue
        x = _number(row.get("step"))
        xs.append(x if x is not None else float(i + 1))
        ys.append(y)
    return xs, ys


def _present(rows: list[Row], keys: Iterable[str]) -> list[str]:
    return [k for k in keys if any(_number(r.get(k)) is not None for r in rows)]


def _moving_average(ys: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


# ---- plots -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    """One figure: which columns it draws and how."""

    file: str  # PNG name in report/
    title: str
    ylabel: str
    keys: tuple[str, ...]  # columns looked for, in legend order
    draw: Callable[[Any, list[Row], list[str]], None]  # (axes, rows, present keys)
    note: str = ""  # what an absent plot usually means


def _lines(ax, rows: list[Row], keys: list[str], markers: bool = False) -> None:
    # Line styles differ too, so equal series (reward and accuracy under a 0/1 rule) both show.
    for color, style, key in zip(COLORS, STYLES * len(COLORS), keys, strict=False):
        xs, ys = series(rows, key)
        if len(xs) > SMOOTH_OVER:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
            window = max(len(xs) // 20, 5)
            label = f"{key} (mean of {window})"
            ax.plot(xs, _moving_average(ys, window), color=color, linestyle=style, linewidth=2, label=label)
        else:
            marker = "o" if markers or len(xs) < 30 else None
            ax.plot(xs, ys, color=color, linestyle=style, linewidth=2, marker=marker, label=key)


def _draw_lines(ax, rows, keys) -> None:
    _lines(ax, rows, keys)


def _draw_weight_sync(ax, rows, keys) -> None:
    # Only steps that pushed weights (the others write 0.0 with --update-weights-interval > 1).
    pushed = [r for r in rows if (_number(r.get("push_weights_s")) or 0.0) > 0.0]
    _lines(ax, pushed, keys, markers=True)


def _draw_failures(ax, rows, keys) -> None:
    if "num_failed" in keys:
        xs, ys = series(rows, "num_failed")
        ax.bar(xs, ys, width=0.8, color=COLORS[1], alpha=0.7, label="num_failed (samples in this step)")
    if "coord_num_reward_failures" in keys:
        xs, ys = series(rows, "coord_num_reward_failures")
        ax.plot(xs, ys, color=COLORS[0], linewidth=2, label="coord_num_reward_failures (run total)")
    ax.set_ylim(0, max(ax.get_ylim()[1], 1))  # counts: from 0, and a frame for a run with none


def _draw_staleness(ax, rows, keys) -> None:
    """Stacked bars: per step, how many trained samples were 0, 1, 2, ... versions behind."""
    hists = [(r.get("step", i + 1), r.get("staleness_hist")) for i, r in enumerate(rows)]
    hists = [(s, h) for s, h in hists if isinstance(h, dict) and h]
    levels = sorted({int(k) for _, h in hists for k in h})
    cmap = _colormap("viridis_r", len(levels))
    bottom = [0.0] * len(hists)
    xs = [float(s) for s, _ in hists]
    for color, level in zip(cmap, levels, strict=True):
        counts = [float(h.get(str(level), 0)) for _, h in hists]
        ax.bar(xs, counts, bottom=bottom, width=0.9, color=color, label=f"{level} behind", linewidth=0)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_ylim(0, max(bottom, default=1) * 1.25 or 1)  # room for the legend above the bars


def _colormap(name: str, n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps[name]
    return [cmap(0.15 + 0.7 * i / max(n - 1, 1)) for i in range(n)]


def _has_staleness_hist(rows: list[Row]) -> bool:
    return any(isinstance(r.get("staleness_hist"), dict) and r["staleness_hist"] for r in rows)


def _prefixed(rows: list[Row], prefixes: tuple[str, ...]) -> tuple[str, ...]:
    keys = {k for r in rows for k in r if k.startswith(prefixes)}
    return tuple(sorted(keys, key=lambda k: (k != "tis_mean", k)))


def plots_for(rows: list[Row]) -> list[Plot]:
    """Every plot the report knows, with the IS-weight and eval columns this run wrote."""
    plots = [
        Plot(
            "reward_accuracy.png", "Reward and accuracy", "per step", ("reward_mean", "accuracy"), _draw_lines
        ),
        Plot(
            "staleness.png",
            "Staleness of trained samples over time",
            "samples",
            ("staleness_hist",),
            _draw_staleness,
            "the trainer wrote no staleness_hist",
        ),
        Plot("tokens_per_s.png", "Trainer throughput", "tokens/s", ("tokens_per_s",), _draw_lines),
        Plot(
            "logprob_mismatch.png",
            "Train / rollout log-prob mismatch",
            "|log p_train - log p_rollout|",
            ("logprob_abs_diff_mean", "logprob_abs_diff_max"),
            _draw_lines,
        ),
        Plot(
            "is_weights.png",
            "Importance-sampling weights",
            "weight / fraction",
            _prefixed(rows, ("tis_", "mis_")) or ("tis_mean",),
            _draw_lines,
            "written with --use-tis / --use-mis",
        ),
        Plot(
            "weight_sync.png",
            "Weight sync (trainer push to the coordinator)",
            "seconds",
            ("push_weights_s",),
            _draw_weight_sync,
        ),
        Plot(
            "reward_failures.png",
            "Reward failures",
            "samples",
            ("num_failed", "coord_num_reward_failures"),
            _draw_failures,
        ),
    ]
    evals = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/") and k.count("/") >= 2})
    for name in evals:
        keys = sorted({k for r in rows for k in r if k.startswith(f"eval/{name}/")})
        lengths = tuple(k for k in keys if k.endswith("_len_mean"))  # tokens: a scale of their own
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        rest = tuple(k for k in keys if k not in lengths)
        plots.append(Plot(f"eval_{safe}.png", f"Eval: {name}", "value", rest or tuple(keys), _draw_lines))
        if lengths and rest:
            plots.append(
                Plot(f"eval_{safe}_len.png", f"Eval: {name}, response length", "tokens", lengths, _draw_lines)
            )
    return plots


def _available(plot: Plot, rows: list[Row]) -> list[str]:
    if plot.draw is _draw_staleness:
        return list(plot.keys) if _has_staleness_hist(rows) else []
    if plot.draw is _draw_weight_sync:
        return list(plot.keys) if any((_number(r.get("push_weights_s")) or 0.0) > 0 for r in rows) else []
    return _present(rows, plot.keys)


def render_png(plot: Plot, rows: list[Row], keys: list[str]) -> bytes:
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    plot.draw(ax, rows, keys)
    ax.set_title(plot.title, fontsize=12)
    ax.set_xlabel("training step")
    ax.set_ylabel(plot.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", ncols=2 if len(keys) > 3 or plot.draw is _draw_staleness else 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---- the page --------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       margin: 24px 32px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
.sub { color: #666; font-size: 13px; margin-bottom: 16px; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 20px; }
td { padding: 3px 14px 3px 0; border-bottom: 1px solid #eee; }
td:first-child { color: #555; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #666; margin-top: 4px; }
.absent { font-size: 13px; color: #555; }
.warn { color: #a40; font-size: 13px; }
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def _summary_rows(run_dir: Path, rows: list[Row]) -> list[tuple[str, str]]:
    rows = [r for r in rows if "eval_version" not in r]  # the coordinator's evaluation rows
    out = [("steps in metrics.jsonl", str(len(rows)))]
    if rows:
        last = rows[-1]
        out += [
            (f"last step: {k}", _fmt(last[k])) for k in ("step", "policy_version", "elapsed_s") if k in last
        ]
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = None
    if isinstance(summary, dict):
        out += [(f"summary: {k}", _fmt(v)) for k, v in summary.items()]
    else:
        out.append(("summary.json", "absent (the run did not finish)"))
    return out


def render_html(
    run_dir: Path, rows: list[Row], figures: list[tuple[Plot, bytes]], absent: list[str], num_bad: int
) -> str:
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Slipstream run report: {e(run_dir.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Run report: {e(run_dir.name)}</h1>",
        f'<div class="sub">{e(str(run_dir.resolve()))} &middot; written {e(time.strftime("%Y-%m-%d %H:%M:%S"))}</div>',
        "<table>",
        *(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in _summary_rows(run_dir, rows)),
        "</table>",
    ]
    if num_bad:
        parts.append(f'<p class="warn">{num_bad} unreadable line(s) in metrics.jsonl were skipped.</p>')
    if not rows:
        parts.append('<p class="warn">metrics.jsonl holds no training step yet: nothing to plot.</p>')
    parts.append('<div class="grid">')
    for plot, png in figures:
        data = base64.b64encode(png).decode()
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{e(plot.title)}">'
            f"<figcaption>{e(plot.file)}</figcaption></figure>"
        )
    parts.append("</div>")
    if absent:
        parts.append('<h2 style="font-size:16px">Not plotted</h2><ul class="absent">')
        parts += [f"<li>{e(line)}</li>" for line in absent]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Draw the report of `run_dir` into `out_dir` (default RUN_DIR/report); returns index.html."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    out = Path(out_dir) if out_dir else run_dir / "report"
    rows, num_bad = read_rows(run_dir / "metrics.jsonl")
    figures: list[tuple[Plot, bytes]] = []
    absent: list[str] = []
    for plot in plots_for(rows) if rows else []:
        keys = _available(plot, rows)
        if not keys:
            why = f": {plot.note}" if plot.note else ""
            absent.append(f"{plot.title}: no values for {', '.join(plot.keys)} in metrics.jsonl{why}")
            continue
        figures.append((plot, render_png(plot, rows, keys)))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):  # plots of an earlier report this run no longer has
        stale.unlink()
    for plot, png in figures:
        (out / plot.file).write_bytes(png)
    index = out / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(render_html(run_dir, rows, figures, absent, num_bad))
    tmp.replace(index)
    return index


def report_at_end(run_dir: str | Path, say: Callable[[str], None] = print) -> Path | None:
    """`write_report` for the launcher: one line either way, and never an exception."""
    try:
        index = write_report(run_dir)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the run's outcome must not depend on its report
        say(f"report: not written ({type(e).__name__}: {e})")
        return None
    say(f"report: {index}")
    return index


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="slipstream report",
        description="Write RUN_DIR/report/index.html (one self-contained page) and a PNG per plot "
        "from the run's metrics.jsonl.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default="", help="where to write the report (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        parser.error(f"{run_dir}: no metrics.jsonl (is it a run directory?)")
    try:
        index = write_report(run_dir, args.out or None)
    except OSError as e:
        print(f"slipstream report: error: {e}", file=sys.stderr)
        return 1
    print(index)
    return 0
