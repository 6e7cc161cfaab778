"""The report's figures: matplotlib (Agg, no display), one panel per metric, readable at a glance.

Each curve figure follows the paper's: x is epochs completed, one line per condition (the mean
over its subset runs) with a +/-1 sd band over them, and a dotted line at 0 where the base model
is. A condition with one subset gets no band, and its legend entry says so. The proxy figures
draw ``selftrain proxies`` output: max-similarity histograms per benchmark with the threshold
marked (the paper's Fig 4), and a KDE of per-sequence NLL per corpus under each student
(Figs 6 and 11). Every function returns a :class:`Drawn` record (file, title, panel titles) that
the report keeps in ``figures.json``, so what a figure holds can be checked without looking.

Figures are drawn on :class:`matplotlib.figure.Figure` objects, never through pyplot's global
state, so drawing in a process that has a display (or other figures open) changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PANEL_SIZE = (4.6, 3.4)
"""Inches per panel."""
COLUMNS = 3
DPI = 110
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22"]


@dataclass
class Drawn:
    """What one figure file holds.

    Args:
        file: its name inside the report's ``figures/``.
        title: the figure's title.
        panels: each panel's title, in reading order.
        caption: one sentence for the summary (what is plotted, what the band is).
        legend: the legend's entries.
    """

    file: str
    title: str
    panels: list[str]
    caption: str
    legend: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """As plain JSON (for ``figures.json``)."""
        return asdict(self)


@dataclass
class Style:
    """How a condition is drawn, the same in every figure."""

    color: str
    dashes: bool
    label: str


def styles(conditions: list[str], runs: dict[str, int], self_trained: set[str]
           ) -> dict[str, Style]:
    """A color per condition; n (or "no band") in the label; self-generated data dashed.

    Dashes set self-generated data apart from the rest, so they are drawn only when some
    conditions are not self-generated.

    Args:
        conditions: condition names, in legend order.
        runs: condition -> its number of runs (subsets).
        self_trained: conditions whose corpus was sampled from the student itself.
    """
    out = {}
    for i, name in enumerate(conditions):
        count = runs[name]
        note = f"n={count} subsets" if count > 1 else "1 subset: no band"
        dashes = name in self_trained and set(conditions) - self_trained != set()
        out[name] = Style(COLORS[i % len(COLORS)], dashes, f"{name} ({note})")
    return out


def _grid(panels: int) -> tuple[Figure, list]:
    columns = min(COLUMNS, panels)
    rows = math.ceil(panels / columns)
    width = max(PANEL_SIZE[0] * columns, 8.0)  # room for the legend under a single panel
    figure = Figure(figsize=(width, PANEL_SIZE[1] * rows + 0.9), dpi=DPI,
                    layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png")


def curve_figure(curve: pd.DataFrame, tags: list[str], style: dict[str, Style], path: Path,
                 title: str, panel_titles: dict[str, str], ylabels: dict[str, str],
                 base_line: bool = True, caption: str = "") -> Drawn:
    """One panel per tag: each condition's mean over epochs, +/-1 sd band over its runs.

    Args:
        curve: :func:`selftrain.analysis.curves.curves` rows.
        tags: the tags to draw, one panel each.
        style: condition -> how it is drawn.
        path: the PNG to write.
        title: the figure's title.
        panel_titles: tag -> its panel's title.
        ylabels: tag -> its y axis label (with units).
        base_line: draw a dotted line at 0 (the base model); else start the y axis at 0.
        caption: what the figure shows, for the summary.
    """
    figure, axes = _grid(len(tags))
    for ax, tag in zip(axes, tags, strict=False):
        rows = curve[curve["tag"] == tag]
        for condition, look in style.items():
            points = rows[rows["condition"] == condition].sort_values("epoch")
            if points.empty:
                continue
            x, mean, sd = (points[c].to_numpy(float) for c in ("epoch", "mean", "sd"))
            ax.plot(x, mean, color=look.color, linestyle="--" if look.dashes else "-",
                    marker="o", markersize=3, linewidth=1.6, label=look.label)
            banded = ~np.isnan(sd)
            if banded.any():
                ax.fill_between(x[banded], (mean - sd)[banded], (mean + sd)[banded],
                                color=look.color, alpha=0.18, linewidth=0)
        if base_line:
            ax.axhline(0.0, color="0.25", linestyle=":", linewidth=1.0, label="base model (0)")
        else:  # counts: from 0, whole numbers, at least 0..1 when nothing is counted
            top = max(1.0, ax.get_ylim()[1])
            ax.set_ylim(bottom=-0.04 * top, top=top)  # points at 0 stay off the spine
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel_titles.get(tag, tag), fontsize=11)
        ax.set_xlabel("epochs completed")
        ax.set_ylabel(ylabels.get(tag, "value"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.25)
    legend = _legend(figure, axes)
    figure.suptitle(title, fontsize=13)
    _save(figure, path)
    return Drawn(path.name, title, [panel_titles.get(t, t) for t in tags], caption, legend)


def generation_figure(by_generation: pd.DataFrame, titles: dict[str, str], path: Path
                      ) -> Drawn:
    """One panel per tag: each chain's final value against its generation, +/-1 sd bars.

    Args:
        by_generation: :func:`selftrain.analysis.curves.by_generation` rows.
        titles: tag -> its panel's title.
        path: the PNG to write.
    """
    tags = list(dict.fromkeys(by_generation["tag"]))
    figure, axes = _grid(len(tags))
    chains = list(dict.fromkeys(by_generation["chain"]))
    for ax, tag in zip(axes, tags, strict=False):
        rows = by_generation[by_generation["tag"] == tag]
        for i, chain in enumerate(chains):
            points = rows[rows["chain"] == chain].sort_values("generation")
            if points.empty:
                continue
            ax.errorbar(points["generation"], points["final_mean"],
                        yerr=points["final_sd"].fillna(0.0), color=COLORS[i % len(COLORS)],
                        marker="o", markersize=4, capsize=3, linewidth=1.6, label=chain)
        ax.set_title(_generation_title(tag, titles), fontsize=11)
        ax.set_xlabel("generation")
        ax.set_ylabel(_generation_ylabel(tag))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.25)
    legend = _legend(figure, axes)
    title = "Iterated generations: where each generation's students end"
    figure.suptitle(title, fontsize=13)
    _save(figure, path)
    caption = ("Final value of each metric for the students of generation g (trained on text "
               "sampled by generation g-1's students; generation 1 on the source's), mean over "
               "subsets, bars ±1 sd.")
    return Drawn(path.name, title, [_generation_title(t, titles) for t in tags], caption,
                 legend)


def _generation_title(tag: str, titles: dict[str, str]) -> str:
    """A panel title naming the family: probe domains repeat across extraction and log p."""
    if tag.startswith("extraction/"):
        return f"extraction: {titles.get(tag, tag)}"
    if tag.startswith("likelihood/"):
        return f"log p(x | y): {titles.get(tag, tag)}"
    return titles.get(tag, tag)


def _generation_ylabel(tag: str) -> str:
    if tag.startswith("extraction/"):
        return "sequences memorized (count)"
    if tag.startswith("likelihood/"):
        return "Δ log p(x | y) vs base (nats)"
    return f"Δ {tag.rsplit('/', 1)[-1]} vs base"


def _legend(figure: Figure, axes: list) -> list[str]:
    """One legend for the whole figure, below the panels, each entry once."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=False):
            entries.setdefault(label, handle)
    if entries:
        figure.legend(list(entries.values()), list(entries), loc="outside lower center",
                      ncols=min(2 if len(axes) == 1 else 3, len(entries)), fontsize=9,
                      frameon=False)
    return list(entries)


def similarity_figure(proxies: list, path: Path) -> Drawn:
    """Max-similarity distribution per benchmark, one histogram per corpus, threshold marked.

    Args:
        proxies: :class:`selftrain.analysis.evidence.Proxies` dirs.
        path: the PNG to write.
    """
    benchmarks = sorted({name for item in proxies for name in item.summary.get("benchmarks", {})})
    figure, axes = _grid(len(benchmarks))
    thresholds = sorted({float(item.summary["threshold"]) for item in proxies
                         if isinstance(item.summary.get("threshold"), (int, float))})
    for ax, benchmark in zip(axes, benchmarks, strict=False):
        for i, item in enumerate(proxies):
            column = f"max_similarity/{benchmark}"
            color = COLORS[i % len(COLORS)]
            stats = item.summary.get("benchmarks", {}).get(benchmark)
            if stats is None:
                continue
            label = item.label  # the same entry in every panel (the means are in the summary)
            if item.samples is not None and column in item.samples:
                values = item.samples[column].dropna().to_numpy(float)
                ax.hist(values, bins=20, density=True, histtype="step", linewidth=1.6,
                        color=color, label=label)
            else:
                histogram = stats.get("max_similarity", {}).get("histogram", {})
                edges, counts = (np.asarray(histogram.get(k, []), float)
                                 for k in ("edges", "counts"))
                if len(edges) == len(counts) + 1 and counts.sum() > 0:
                    ax.stairs(counts / counts.sum() / np.diff(edges), edges, color=color,
                              linewidth=1.6, label=label)
        for threshold in thresholds:
            ax.axvline(threshold, color="0.2", linestyle="--", linewidth=1.0,
                       label=f"threshold {threshold:g}")
        ax.set_title(benchmark, fontsize=11)
        ax.set_xlabel("max cosine similarity to a benchmark item")
        ax.set_ylabel("density (per sample)")
        ax.grid(alpha=0.25)
    legend = _legend(figure, axes)
    title = "Benchmark proximity: each sample's max similarity to the benchmark's items"
    figure.suptitle(title, fontsize=13)
    _save(figure, path)
    return Drawn(path.name, title, benchmarks,
                 "Distribution of each corpus sample's max cosine similarity to the items of "
                 "each benchmark (embedding model in the proxies summary); dashed: the threshold.",
                 legend)


def nll_figure(proxies: list, path: Path) -> Drawn | None:
    """KDE of per-sequence NLL per corpus, one panel per scoring student, means dashed.

    Args:
        proxies: :class:`selftrain.analysis.evidence.Proxies` dirs; those without NLL are skipped.
        path: the PNG to write.

    Returns:
        None when no proxies dir has NLL values.
    """
    from scipy.stats import gaussian_kde

    scored = [item for item in proxies if item.samples is not None and "nll" in item.samples
              and item.samples["nll"].notna().any()]
    students = sorted({str(item.summary.get("student")) for item in scored})
    if not students:
        return None
    figure, axes = _grid(len(students))
    for ax, student in zip(axes, students, strict=False):
        for i, item in enumerate(proxies):
            if item not in scored or str(item.summary.get("student")) != student:
                continue
            values = item.samples["nll"].dropna().to_numpy(float)
            color, mean = COLORS[i % len(COLORS)], float(values.mean())
            label = f"{item.label} (mean {mean:.2f})"
            if len(values) > 1 and np.ptp(values) > 0:
                grid = np.linspace(values.min() - values.std(), values.max() + values.std(), 256)
                ax.plot(grid, gaussian_kde(values)(grid), color=color, linewidth=1.6, label=label)
                label = None
            ax.axvline(mean, color=color, linestyle="--", linewidth=1.0, label=label)
        ax.set_title(f"scored by {student}", fontsize=11)
        ax.set_xlabel("mean NLL per token of a sample (nats)")
        ax.set_ylabel("density")
        ax.grid(alpha=0.25)
    legend = _legend(figure, axes)
    title = "Likelihood under the student: per-sample NLL of each corpus"
    figure.suptitle(title, fontsize=13)
    _save(figure, path)
    return Drawn(path.name, title, [f"scored by {s}" for s in students],
                 "Kernel density of each sample's mean per-token NLL under the student; dashed "
                 "lines: each corpus's mean.", legend)


def scatter_figure(joined: pd.DataFrame, proxies: dict[str, str], tags: list[str],
                   panel_titles: dict[str, str], path: Path) -> Drawn | None:
    """Each proxy against each benchmark's final delta: one point per run (its subset).

    Args:
        joined: :func:`selftrain.analysis.evidence.join` rows.
        proxies: proxy column -> its name.
        tags: benchmark-delta tags; one panel per (proxy, tag) with points.
        panel_titles: tag -> task and metric in words.
        path: the PNG to write.

    Returns:
        None when no run has both a proxy and a gain.
    """
    matched = joined[joined["condition"].notna()] if not joined.empty else joined
    pairs = [(p, t) for p in proxies for t in tags
             if not matched.empty and t in matched and matched[[p, t]].dropna().shape[0]]
    if not pairs:
        return None
    figure, axes = _grid(len(pairs))
    titles = []
    for ax, (proxy, tag) in zip(axes, pairs, strict=False):
        points = matched[["condition", proxy, tag]].dropna()
        ax.scatter(points[proxy], points[tag], color=COLORS[0], s=28, zorder=3)
        for row in points.itertuples(index=False):
            ax.annotate(str(row[0]), (row[1], row[2]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(0.0, color="0.25", linestyle=":", linewidth=1.0)
        ax.margins(x=0.3, y=0.15)  # room for the point labels
        titles.append(f"{panel_titles.get(tag, tag)} vs {proxies[proxy]}")
        ax.set_title(titles[-1], fontsize=9)
        ax.set_xlabel(proxies[proxy])
        ax.set_ylabel("final Δ vs base")
        ax.grid(alpha=0.25)
    title = "Proxies against realised gains (one point per run)"
    figure.suptitle(title, fontsize=13)
    _save(figure, path)
    return Drawn(path.name, title, titles,
                 "Each proxy over a run's training subset against that run's final "
                 "benchmark change, labelled by condition.")
