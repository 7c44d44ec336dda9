"""PNG plots of the report table (eval.report): metrics against step per run, and against mixture share across runs.

Each function draws one figure and returns what it plotted ({panel: {series: [[x, y, lo, hi], ...]}}), which
eval.report saves as plots.json, so the figures can be checked and re-drawn without parsing images. `draw` is the one
place figures are made (the sweep and durability reports use it too): a y=0 line on signed panels, one colour per
series across panels, the legend outside the axes, sensible axes for a single x value, and no figure at all for a
plot across runs whose x axis would hold one value.
"""
from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import storage  # noqa: E402

Series = dict[str, list[list[float]]]


def _metric_names(rows: Sequence[dict[str, Any]], prefix: str, suffix: str) -> list[str]:
    names = []
    for row in rows:
        for key in row:
            if key.startswith(prefix) and key.endswith(suffix) and key[len(prefix):-len(suffix)] not in names:
                names.append(key[len(prefix):-len(suffix)])
    return names


def _point(row: dict[str, Any], x: float, key: str, lo_key: str | None, hi_key: str | None) -> list[float]:
    y = float(row[key])
    lo = float(row[lo_key]) if lo_key and lo_key in row else y
    hi = float(row[hi_key]) if hi_key and hi_key in row else y
    return [float(x), y, lo, hi]


def _panels(metrics: list[tuple[str, str, str | None, str | None]], rows: Sequence[dict[str, Any]], x_of,
            group_of) -> dict[str, Series]:
    """{panel title: {group: [[x, y, lo, hi], ...]}} for every (title, key, lo_key, hi_key) metric present."""
    panels: dict[str, Series] = {}
    for title, key, lo_key, hi_key in metrics:
        series: Series = {}
        for row in rows:
            x = x_of(row)
            if key in row and row[key] != "" and x is not None:
                series.setdefault(group_of(row), []).append(_point(row, x, key, lo_key, hi_key))
        if series:
            panels[title] = {g: sorted(pts) for g, pts in series.items()}
    return panels


SIGNED = ("probe margin", "margin", "shift")  # titles of panels whose zero means "no preference" / "no change"


def x_values(panels: dict[str, Series]) -> list[float]:
    """The distinct x values of every point of every panel, sorted."""
    return sorted({p[0] for series in panels.values() for pts in series.values() for p in pts})


def draw(panels: dict[str, Series], xlabel: str, path: storage.PathLike, *, lines: bool, integer_x: bool = False,
         min_x_values: int = 1, dodge: bool = False) -> bool:
    """One PNG (local or gs://): a panel per title (sharing the x axis), a series per label (one colour per label in every panel),
    points [x, y, lo, hi] with (lo, hi) as error bars. Panels of signed quantities (titles starting with SIGNED) get a
    y=0 line; the legend sits below the panels, outside every axes, so it never covers a point; integer_x: integer x
    ticks; a single x value is one tick in a padded axis; dodge: series that share x values are drawn side by side
    (each shifted by a fixed small fraction of the x range; plots.json keeps the true x). Draws nothing and returns
    False when the figure has fewer than `min_x_values` distinct x values (a plot across runs that all share one x
    value says nothing); else True."""
    xs = x_values(panels)
    if panels and len(xs) < min_x_values:
        return False
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    step = _dodge_step(xs, integer_x, len(labels)) if dodge else 0.0
    ncols = min(len(labels), 3) or 1
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4 + 0.2 * -(-len(labels) // ncols)), squeeze=False,
                             sharex=True, layout="constrained")
    for ax, (title, series) in zip(axes[0], panels.items()):
        if title.startswith(SIGNED):
            ax.axhline(0.0, color="0.35", linewidth=0.9, zorder=1)
        for label, pts in series.items():
            shift = (labels.index(label) - (len(labels) - 1) / 2) * step
            px, ys = [p[0] + shift for p in pts], [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(px, ys, yerr=err, marker="o", capsize=3, label=label, color=colors[label], zorder=2,
                        linestyle="-" if lines else "none")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        _x_axis(ax, xs, integer_x)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    if labels:
        handles = {}
        for ax in axes[0]:
            handles |= dict(zip(*ax.get_legend_handles_labels()[::-1]))
        fig.legend([handles[label] for label in labels], labels, loc="outside lower center", ncols=ncols, fontsize=7)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no data", ha="center", va="center")
    save(fig, path)
    return True


def save(fig: matplotlib.figure.Figure, path: storage.PathLike) -> None:
    """Writes `fig` as a PNG to `path` (local or gs://, through storage) and closes it."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    storage.Path(path).write_bytes(png.getvalue())


def _pad(x: float, integer: bool) -> float:
    return max(abs(x) * 0.1, 1.0 if integer else 0.05)


def _x_axis(ax: plt.Axes, xs: list[float], integer: bool) -> None:
    """Integer ticks when asked; one x value: that value as the only tick, padded on both sides."""
    if integer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(xs) == 1:
        ax.set_xlim(xs[0] - _pad(xs[0], integer), xs[0] + _pad(xs[0], integer))
        ax.set_xticks(xs)


def _dodge_step(xs: list[float], integer: bool, series: int) -> float:
    """x distance between neighbouring series: together they span 4% of the x range (40% of one value's pad)."""
    if series < 2 or not xs:
        return 0.0
    span = 0.04 * (xs[-1] - xs[0]) if len(xs) > 1 else 0.4 * _pad(xs[0], integer)
    return span / (series - 1)


def _metrics(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str | None, str | None]]:
    probe = [(f"probe margin: {n} (nats/token)", f"probe/{n}/margin", f"probe/{n}/margin_lo", f"probe/{n}/margin_hi")
             for n in _metric_names(rows, "probe/", "/margin")]
    held = [(f"held-out loss: {n}", f"heldout/{n}/loss", None, None) for n in _metric_names(rows, "heldout/", "/loss")]
    anima = [(f"ANIMA {k}", f"anima/{k}", None, None) for k in ("overall_mean", "dimension_normalized_avg")
             if any(f"anima/{k}" in r for r in rows)]
    return probe + held + anima


def against_step(rows: Sequence[dict[str, Any]], path: storage.PathLike) -> dict[str, Series]:
    """Probe margins (95% CI bars), held-out losses and ANIMA scores against step, one line per run."""
    numbered = {r["run"] for r in rows if r["checkpoint"] != "hf"}
    # The hf export repeats the final step; use it only for runs without numbered checkpoints.
    use = [r for r in rows if r["checkpoint"] != "hf" or r["run"] not in numbered]
    panels = _panels(_metrics(use), use, lambda r: r["step"], lambda r: r["run"])
    draw(panels, "step", path, lines=True, integer_x=True)
    return panels


def arm_name(run: str) -> str:
    """Runs that differ only by a seed suffix (`_s3`, `-seed3`) are one arm: one series (and colour) per arm."""
    return re.sub(r"[_-](s|seed)\d+$", "", run)


def against_share(rows: Sequence[dict[str, Any]], share_component: str, path: storage.PathLike
                  ) -> dict[str, Series] | None:
    """Each run's final checkpoint against its mixture share of `share_component`: one series per arm (runs named
    alike up to a seed suffix), seeds as separate points. None (nothing drawn) when every run has the same share."""
    final_step: dict[str, int] = {}
    for r in rows:
        if r.get("share") is not None and r["step"] is not None:
            final_step[r["run"]] = max(final_step.get(r["run"], r["step"]), r["step"])
    # A run's numbered final checkpoint and its hf export are the same step: merge their results.
    final: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["run"] in final_step and r["step"] == final_step[r["run"]]:
            final.setdefault(r["run"], {}).update(r)
    last = list(final.values())
    panels = _panels(_metrics(last), last, lambda r: r["share"], lambda r: arm_name(r["run"]))
    drawn = draw(panels, f"mixture share of '{share_component}'", path, lines=False, min_x_values=2)
    return panels if drawn else None


def training_curves(curves: dict[str, list[tuple[int, float]]], path: storage.PathLike) -> dict[str, Series]:
    """Training loss from metrics.jsonl against step, one line per run."""
    panels = {"training loss": {run: [[float(s), float(v), float(v), float(v)] for s, v in pts]
                                for run, pts in curves.items() if pts}}
    draw(panels if panels["training loss"] else {}, "step", path, lines=True, integer_x=True)
    return panels
