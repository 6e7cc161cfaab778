"""`selftrain report`: the paper's evidence from many runs, as figures, summary.md and report.html.

TensorBoard shows one run at a time; the paper's claims are about conditions (a source, a
temperature, a corpus kind, a student) each trained on several disjoint subsets. This command
reads the event files and saved configs of many runs (:mod:`selftrain.analysis.runs`), groups
them into conditions, and writes a report dir:

- ``figures/*.png``: benchmark deltas per task metric (Figs 2, 3, 5, 7, 9, 10), extraction
  counts and log p deltas per probe domain (Fig 8), and from ``selftrain proxies`` dirs the
  max-similarity histograms (Fig 4), the NLL KDEs (Figs 6, 11) and proxies against gains;
  with iterated generations (conditions ``X@gN``, as ``selftrain sweep`` names them), each
  chain's final values against its generation;
- ``summary.md`` and ``report.html`` (self-contained: figures inline, no network): final and
  best deltas with sd and n, each corpus's proxies beside its gain, and their Spearman rank
  correlation with what so few corpora can and cannot show;
- ``scalars.csv``: the tidy table every number comes from; ``figures.json``: each figure's panels.

The dir appears whole or not at all, an existing report is replaced only with ``--overwrite``,
and bad input is refused in one line before anything is written.
"""

from __future__ import annotations

import itertools
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from selftrain.analysis import figures
from selftrain.analysis.curves import (
    FAMILIES,
    base_values,
    by_generation,
    common_tags,
    curves,
    family_tags,
    final_and_best,
)
from selftrain.analysis.evidence import PROXIES, correlations, join, load_proxies
from selftrain.analysis.items import between, items_file, metric_items, paired
from selftrain.analysis.outline import Findings, build
from selftrain.analysis.pages import html_page, markdown
from selftrain.analysis.runs import Run, find_runs, load_runs, name_conditions, read_table
from selftrain.errors import SelftrainError
from selftrain.io import atomic_dir, write_json_atomic, write_text_atomic
from selftrain.outputs import check_out_dir, refuse_input_overlap

log = logging.getLogger(__name__)

MARKER = "summary.md"
ENTRIES = (MARKER, "report.html", "figures", "figures.json", "scalars.csv")
"""Everything a report dir holds; only such a dir is ever replaced."""


def report(runs: list[str], out: str, proxies: list[str] | None = None,
           conditions: dict[str, str] | None = None, overwrite: bool = False,
           note: str | None = None) -> Path:
    """Write figures, summary.md and a self-contained report.html from many runs' event files.

    Args:
        runs: run dirs (each a fit's ``--trainer.default_root_dir``: ``tb/config.yaml`` or event
            files under ``tb/``); a dir that is not a run is searched for runs.
        out: the report dir to write (whole or not at all).
        proxies: dirs written by ``selftrain proxies``; joined to the runs by corpus path.
        conditions: run dir (or a dir holding runs) -> condition name, instead of the name
            built from the configs; runs given the same name are one condition.
        overwrite: replace an existing report at ``out``.
        note: a line printed under the report's title (what the runs are).

    Returns:
        The report dir.
    """
    target = Path(out)
    check_out_dir(target, overwrite, (MARKER,), ENTRIES, "report")
    paths = find_runs(runs)
    proxy_dirs = load_proxies(proxies)
    refuse_input_overlap(target, [*(("--runs", p) for p in paths),
                                  *(("--proxies", p) for p in proxies or [])])
    loaded = load_runs(paths)
    name_conditions(loaded, conditions)
    notes = [line for run in loaded for line in run.notes]
    loaded = _with_events(loaded, runs, notes)
    table = read_table(loaded)
    table, loaded = _evaluated(table, loaded, notes)
    table = _common(table, notes)
    found = _findings(table, loaded, proxy_dirs, notes, note)
    for line in notes:
        log.warning("selftrain report: %s", line)
    with atomic_dir(target) as staging:
        _write(staging, table, found, proxy_dirs)
    log.info("selftrain report: %d run(s), %d condition(s), %d figures -> %s", len(loaded),
             len(found.conditions), len(found.figures), target)
    return target


def _with_events(runs: list[Run], given: list[str], notes: list[str]) -> list[Run]:
    kept = [run for run in runs if any(run.tb.glob("events.out.tfevents.*"))]
    if not kept:
        raise SelftrainError(f"--runs {' '.join(given)}: no TensorBoard event files in any run "
                             "(<run>/tb/events.out.tfevents.*); report runs that have trained")
    notes += [f"{run.label}: no event files in tb/; left out" for run in runs if run not in kept]
    return kept


def _evaluated(table: pd.DataFrame, runs: list[Run], notes: list[str]
               ) -> tuple[pd.DataFrame, list[Run]]:
    evaluated = set(table["run"])
    if not evaluated:
        raise SelftrainError(f"--runs {' '.join(r.label for r in runs)}: no run logged an "
                             "evaluation (eval/epochs_completed); add the evaluation callbacks "
                             "to the fits")
    notes += [f"{run.label}: no evaluations (eval/epochs_completed); left out"
              for run in runs if run.label not in evaluated]
    return table, [run for run in runs if run.label in evaluated]


def _common(table: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Keep the tags every run logged; say what was left out; refuse no common benchmark."""
    everywhere, left_out = common_tags(table)
    for tag, missing in left_out.items():
        notes.append(f"{tag}: not logged by {', '.join(missing)}; left out")
    logged = set(table["tag"])
    for family in FAMILIES:
        if family_tags(logged, family) and not family_tags(everywhere, family):
            if family == "benchmark":
                tasks = table[table["tag"].str.startswith("benchmark_delta/")]
                per_run = tasks.groupby("run")["tag"].agg(lambda t: sorted(set(t)))
                shown = "; ".join(f"{run}: {', '.join(tags)}" for run, tags in per_run.items())
                raise SelftrainError(f"--runs: the runs share no benchmark task metric ({shown}); "
                                     "report runs evaluated on a common task")
    return table[table["tag"].isin(everywhere)].reset_index(drop=True)


def _titles(tags: set[str]) -> dict[str, str]:
    titles = {}
    for tag in tags:
        for family, pattern in FAMILIES.items():
            match = pattern.match(tag)
            if match and family == "benchmark":
                titles[tag] = f"{match['task']}: {match['metric']}"
            elif match:
                titles[tag] = match["domain"] or "all domains"
    return titles


def _conditions(runs: list[Run], table: pd.DataFrame) -> list[dict]:
    rows = []
    for name in sorted({run.condition for run in runs}):
        members = [run for run in runs if run.condition == name]
        first = members[0]
        corpora = {str(run.corpus) for run in members}
        epochs = table[table["condition"] == name]["epoch"]
        subsets = sorted({run.subset for run in members if run.subset is not None})
        rows.append({"condition": name, "student": first.student or "—",
                     "source": first.source or "—",
                     "T": "—" if first.temperature is None else f"{first.temperature:g}",
                     "corpus kind": first.kind or "—",
                     "corpus": first.get("data.corpus") if len(corpora) == 1 else "several",
                     "subsets": ", ".join(map(str, subsets)) or "—", "runs": len(members),
                     "epochs": int(epochs.max()) if len(epochs) else 0,
                     "_self": bool(first.student and first.student == first.source)})
    return rows


def _findings(table: pd.DataFrame, runs: list[Run], proxy_dirs: list, notes: list[str],
              heading: str | None) -> Findings:
    curve = curves(table)
    per_condition = {c: sum(r.condition == c for r in runs) for c in {r.condition for r in runs}}
    tags = set(table["tag"])
    directions = {tag: higher for run in runs for tag, higher in run.directions.items()}
    undeclared = sorted(tag for tag in family_tags(tags, "benchmark") if tag not in directions)
    if undeclared:
        notes.append(f"{', '.join(undeclared)}: no lm-eval results file says which way is "
                     "better; the best epoch takes the direction from the metric's name")
    finals = {family: _ordered(final_and_best(
        curve[curve["tag"].isin(family_tags(tags, family))], per_condition, directions),
        family_tags(tags, family)) for family in FAMILIES}
    finals["benchmark"], compared = _item_evidence(finals["benchmark"], curve, runs, notes)
    conditions = _conditions(runs, table)
    joined = join(proxy_dirs, runs, _run_finals(table, finals["benchmark"]))
    for item in proxy_dirs:
        if all(run.corpus != item.corpus for run in runs):
            notes.append(f"--proxies {item.path}: its corpus {item.corpus} is no run's "
                         "data.corpus; shown without a gain")
        elif item.samples is None:
            notes.append(f"--proxies {item.path}: no samples.parquet, so its runs get the "
                         "corpus-level proxies, not their subset's")
    thresholds = {item.summary.get("threshold") for item in proxy_dirs}
    threshold = next(iter(thresholds)) if len(thresholds) == 1 else None
    return Findings(
        conditions=conditions,
        runs=[{"run": r.label, "condition": r.condition,
               "subset": "—" if r.subset is None else r.subset, **_trained_on(r)}
              for r in runs],
        benchmark=finals["benchmark"], compared=compared, extraction=finals["extraction"],
        likelihood=finals["likelihood"], extraction_base=base_values(curve),
        joined=joined, correlations=correlations(joined, family_tags(tags, "benchmark")),
        threshold=threshold if isinstance(threshold, (int, float)) else None,
        figures=[], notes=notes, titles=_titles(tags), heading=heading or "",
        proxies_given=bool(proxy_dirs),
        generations=by_generation(pd.concat([finals[f] for f in FAMILIES], ignore_index=True)),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _run_finals(table: pd.DataFrame, finals: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Run label -> benchmark tag -> the run's own delta at its condition's final epoch.

    Args:
        table: the tidy scalars (run, condition, tag, step, epoch, value).
        finals: the benchmark rows of :func:`final_and_best` (tag, condition, final_epoch).
    """
    gains: dict[str, dict[str, float]] = {}
    for r in finals.itertuples():
        rows = table[(table["tag"] == r.tag) & (table["condition"] == r.condition)
                     & (table["epoch"] == r.final_epoch)].sort_values("step")
        for run, value in rows.groupby("run")["value"].last().items():
            gains.setdefault(run, {})[r.tag] = float(value)
    return gains


def _trained_on(run: Run) -> dict[str, str]:
    """A run's training rows, tokens and probe-leak rows, as its fit logged them ("—": none).

    Tokens are in the student's tokenizer after cutting at ``max_length``; leak rows share a
    token n-gram with a probe window.
    """

    def shown(key: str) -> str:
        value = run.data.get(key)
        return "—" if value is None else f"{int(value):,}"

    return {"rows": shown("train_rows"), "tokens": shown("train_tokens"),
            "probe leaks": shown("probe_leak_rows")}


def _item_evidence(rows: pd.DataFrame, curve: pd.DataFrame, runs: list[Run],
                   notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each final delta's SE over items, and every two conditions' final deltas compared.

    Where every run of the condition kept per-item results at epoch 0 and at the final epoch,
    the SE (``item_se``) is that of the paired per-item difference from the base
    (:func:`selftrain.analysis.items.paired`); ``se_from`` says over how many items or
    documents. Otherwise (runs from before per-item results were kept, or a metric with no
    per-item form) it falls back to the mean over runs of lm-eval's SE of the final score
    (``benchmark_stderr/<task>/<metric>``, only with ``bootstrap_iters`` > 0), which ignores the
    pairing, and says so; NaN where there is neither.

    Returns:
        ``rows`` with ``item_se`` and ``se_from``; and one row per tag and pair of conditions
        scored on the same items: tag, first, second, difference (first's final delta minus
        second's), item_se (of the per-item difference), n, form, runs_se (from the sd over
        runs: ``sqrt(sd1^2 / n1 + sd2^2 / n2)``).
    """
    stderr = {(r.tag, r.condition, r.epoch): r.mean for r in curve.itertuples()
              if r.tag.startswith("benchmark_stderr/")}
    tables: dict[tuple[Path, int], pd.DataFrame | None] = {}

    def table(run: Run, epoch: int) -> pd.DataFrame | None:
        if (run.path, epoch) not in tables:
            found = items_file(run.path / "eval", epoch)
            tables[run.path, epoch] = None if found is None else pd.read_parquet(found)
        return tables[run.path, epoch]

    kept: dict[str, dict[str, tuple]] = {}  # tag -> condition -> (its pairs, its row)
    se, se_from = [], []
    for r in rows.itertuples():
        members = [run for run in runs if run.condition == r.condition]
        sides = [(table(run, 0), table(run, r.final_epoch)) for run in members]
        result = None
        if members and all(before is not None and after is not None for before, after in sides):
            pairs = [(metric_items(before, r.tag), metric_items(after, r.tag))
                     for before, after in sides]
            result = paired(pairs)
            if result is not None:
                kept.setdefault(r.tag, {})[r.condition] = (pairs, r)
        if result is not None:
            se.append(result.se)
            se_from.append(f"paired, {result.n} {result.form}")
        else:
            fallback = stderr.get((r.tag.replace("benchmark_delta/", "benchmark_stderr/", 1),
                                   r.condition, r.final_epoch), float("nan"))
            se.append(fallback)
            se_from.append("—" if math.isnan(fallback) else "score SE, unpaired")
    rows = rows.copy()
    rows["item_se"], rows["se_from"] = se, se_from
    compared = []
    for tag, by_condition in kept.items():
        unpaired = []
        for (name, (pairs, row)), (other, (other_pairs, other_row)) in itertools.combinations(
                sorted(by_condition.items()), 2):
            result = between(pairs, other_pairs)
            if result is None:
                unpaired.append(f"{name} / {other}")
                continue
            spread = [(row.final_sd, row.n), (other_row.final_sd, other_row.n)]
            runs_se = math.sqrt(sum(sd ** 2 / n for sd, n in spread))
            compared.append({"tag": tag, "first": name, "second": other,
                             "difference": result.delta, "item_se": result.se, "n": result.n,
                             "form": result.form, "runs_se": runs_se})
        if unpaired:
            notes.append(f"{tag}: {', '.join(unpaired)} were evaluated on different items "
                         "(another limit or task version); not compared item by item")
    return rows, pd.DataFrame(compared, columns=["tag", "first", "second", "difference",
                                                 "item_se", "n", "form", "runs_se"])


def _ordered(rows: pd.DataFrame, tags: list[str]) -> pd.DataFrame:
    """Rows in the order of the figures' panels (tags), then by condition."""
    order = {tag: i for i, tag in enumerate(tags)}
    return rows.sort_values(["tag", "condition"], key=lambda col: col.map(order)
                            if col.name == "tag" else col, ignore_index=True)


def _draw(folder: Path, table: pd.DataFrame, found: Findings, proxy_dirs: list
          ) -> list[figures.Drawn]:
    curve = curves(table)
    names = [c["condition"] for c in found.conditions]
    style = figures.styles(names, {c["condition"]: c["runs"] for c in found.conditions},
                           {c["condition"] for c in found.conditions if c["_self"]})
    tags = set(table["tag"])
    drawn = []
    band = ("mean over a condition's subset runs, band ±1 sd over them; dashed (beside other "
            "sources): self-generated data")
    specs = [
        ("benchmark", "benchmark_delta.png", "Benchmark change from the base model",
         lambda t: f"Δ {t.rsplit('/', 1)[-1]} vs base", True,
         f"Change of each benchmark metric from the base model (epoch 0) per epoch; {band}."),
        ("extraction", "extraction.png", "Verbatim extraction of held-out probes",
         lambda t: "sequences memorized (count)", False,
         f"Probe rows the student reproduces exactly (greedy continuation of the prefix); {band}."),
        ("likelihood", "likelihood.png", "Log-likelihood of the true continuation vs the base",
         lambda t: "Δ log p(x | y) vs base (nats)", True,
         f"Mean change of log p(true continuation | prefix) from the base model; {band}."),
    ]
    for family, file, title, ylabel, base, caption in specs:
        chosen = family_tags(tags, family)
        if chosen:
            drawn.append(figures.curve_figure(
                curve, chosen, style, folder / file, title, found.titles,
                {t: ylabel(t) for t in chosen}, base_line=base, caption=caption))
    if not found.generations.empty:
        drawn.append(figures.generation_figure(found.generations, found.titles,
                                               folder / "generations.png"))
    if proxy_dirs:
        if any(item.summary.get("benchmarks") for item in proxy_dirs):
            drawn.append(figures.similarity_figure(proxy_dirs, folder / "similarity.png"))
        for extra in (figures.nll_figure(proxy_dirs, folder / "nll_kde.png"),
                      figures.scatter_figure(found.joined, PROXIES, family_tags(tags, "benchmark"),
                                             found.titles, folder / "proxies_vs_gain.png")):
            if extra is not None:
                drawn.append(extra)
    return drawn


def _write(staging: Path, table: pd.DataFrame, found: Findings, proxy_dirs: list) -> None:
    (staging / "figures").mkdir()
    found.figures = _draw(staging / "figures", table, found, proxy_dirs)
    write_json_atomic([d.as_dict() for d in found.figures], staging / "figures.json")
    table.to_csv(staging / "scalars.csv", index=False)
    page = build(found)
    write_text_atomic(markdown(page), staging / MARKER)
    write_text_atomic(html_page(page, staging, "selftrain report"), staging / "report.html")
