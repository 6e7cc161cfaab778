"""What the report says, in order: conditions, benchmark deltas, probes, proxies, figures, notes.

:mod:`selftrain.analysis.report` computes the numbers; this module lays them out as a
:class:`selftrain.analysis.pages.Page` (rendered as ``summary.md`` and ``report.html``). Every
table quotes n, the number of runs (disjoint subsets) behind each mean, and the sd over them;
the proxy section states, in words, what a rank correlation over that few points can show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from selftrain import __version__
from selftrain.analysis.curves import relative_change
from selftrain.analysis.evidence import ALPHA, NO_RELATION_EFFECT, PROXIES
from selftrain.analysis.figures import Drawn
from selftrain.analysis.pages import Page


@dataclass
class Findings:
    """Everything the report states (built by :mod:`selftrain.analysis.report`).

    Args:
        conditions: one row per condition (name, student, source, temperature, kind, corpus,
            subsets, runs, epochs).
        runs: one row per run (run, condition, subset).
        benchmark: final/best rows of the benchmark-delta tags.
        compared: every two conditions' final deltas, paired over items (tag, first, second,
            difference, item_se, n, form, runs_se).
        extraction: final/best rows of the extraction counts.
        likelihood: final/best rows of the log p deltas.
        extraction_base: (tag, condition) -> memorized count at epoch 0.
        joined: proxies beside gains (:func:`selftrain.analysis.evidence.join`).
        correlations: Spearman rows.
        threshold: the proxies' similarity threshold, if any.
        figures: the figures drawn.
        notes: what was left out or guessed, one line each.
        titles: tag -> its task and metric (or domain) in words.
        heading: a line under the title (what the runs are).
        proxies_given: whether proxies dirs were given.
        generations: final rows by chain and generation (empty without iterated generations).
        created: when the report was written.
    """

    conditions: list[dict]
    runs: list[dict]
    benchmark: pd.DataFrame
    compared: pd.DataFrame
    extraction: pd.DataFrame
    likelihood: pd.DataFrame
    extraction_base: dict[tuple[str, str], float]
    joined: pd.DataFrame
    correlations: pd.DataFrame
    threshold: float | None
    figures: list[Drawn]
    notes: list[str]
    titles: dict[str, str]
    heading: str = ""
    proxies_given: bool = False
    generations: pd.DataFrame = field(default_factory=pd.DataFrame)
    created: str = field(default="")


def num(value: float, signed: bool = False, digits: int = 4) -> str:
    """A number for a table: NaN as an em dash, deltas with a sign."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value == 0:
        return "0"
    return f"{value:+.{digits}g}" if signed else f"{value:.{digits}g}"


def build(found: Findings) -> Page:
    """The report's outline.

    Args:
        found: the numbers and figures.
    """
    page = Page()
    page.add("h1", "selftrain report")
    if found.heading:
        page.add("note", found.heading)
    runs = len(found.runs)
    count = len(found.conditions)
    page.add("p", f"{runs} run{'s' * (runs != 1)} in {count} condition{'s' * (count != 1)}; "
                  f"selftrain {__version__}, {found.created}. Means are over a condition's "
                  "runs (one per disjoint corpus subset), sd is the sample sd over them "
                  "(undefined with one run), n is the number of runs.")
    if found.notes:
        page.add("h2", "Left out and fallbacks")
        page.add("list", found.notes)
    _conditions(page, found)
    _benchmarks(page, found)
    _probes(page, found)
    if found.proxies_given:
        _proxies(page, found)
    if not found.generations.empty:
        _generations(page, found)
    page.add("h2", "Figures")
    for drawn in found.figures:
        page.add("h3", drawn.title)
        page.add("figure", (f"figures/{drawn.file}", drawn.caption))
    page.add("h2", "Runs")
    page.add("p", "Rows and tokens: what each run trained on per epoch, in the student's "
                  "tokenizer after cutting at max_length. Probe leaks: training rows that share "
                  "a token n-gram with a held-out probe window (refused unless the fit allowed "
                  "them; — where the run had no probe set or predates the check).")
    headers = ["run", "condition", "subset", "rows", "tokens", "probe leaks"]
    page.add("table", (headers, [[r.get(h, "—") for h in headers] for r in found.runs]))
    return page


def _generations(page: Page, found: Findings) -> None:
    page.add("h2", "Iterated generations")
    page.add("p", "Generation g trains on text sampled by the students of generation g-1 (the "
                  "same condition and subset); generation 1 on the source's. Final values, "
                  "mean and sd over subsets.")
    rows = [[found.titles.get(r.tag, r.tag), r.chain, r.generation, num(r.final_mean, True),
             num(r.final_sd), r.n] for r in found.generations.itertuples()]
    page.add("table", (["metric", "chain", "generation", "final", "sd", "n"], rows))


def _conditions(page: Page, found: Findings) -> None:
    page.add("h2", "Conditions")
    page.add("p", "Runs whose configs differ only in the subset (or in where they ran, seeds, "
                  "training length, evaluation callbacks, hardware) form one condition.")
    headers = ["condition", "student", "source", "T", "corpus kind", "corpus", "subsets", "runs",
               "epochs"]
    page.add("table", (headers, [[c[h] for h in headers] for c in found.conditions]))


def _benchmarks(page: Page, found: Findings) -> None:
    page.add("h2", "Benchmark change from the base model")
    if found.benchmark.empty:
        page.add("p", "No benchmark deltas were logged (no BenchmarkEval callback).")
        return
    page.add("p", "Final: the last epoch every run of the condition reached. Best: the epoch "
                  "after 0 with the best mean, in the direction each lm-eval task declares "
                  "(higher_is_better); as the extreme of noisy means it is biased away from "
                  "zero, so compare conditions on the final values. "
                  "sd is over the condition's runs (subsets). Item SE is the standard error of "
                  "the final delta over the benchmark's items: of the paired per-item "
                  "difference from the base, averaged over the runs (\"paired, N items\"), for "
                  "bits per byte that of the ratio over N documents (\"paired, N documents\"); "
                  "where runs kept no per-item results, lm-eval's SE of the final score "
                  "(\"score SE, unpaired\", which overstates it); none for perplexities.")
    empty = pd.Series(math.nan, index=found.benchmark.index)
    item_se = found.benchmark.get("item_se", empty)
    se_from = found.benchmark.get("se_from", empty.astype(object).fillna("—"))
    rows = [[found.titles.get(r.tag, r.tag), r.condition, r.final_epoch, num(r.final_mean, True),
             num(r.final_sd), num(se), source, r.n, r.best_epoch, num(r.best_mean, True),
             num(r.best_sd), r.best_n]
            for r, se, source in zip(found.benchmark.itertuples(), item_se, se_from,
                                     strict=True)]
    page.add("table", (["task / metric", "condition", "final epoch", "final Δ", "sd", "item SE",
                        "SE from", "n", "best epoch", "best Δ", "sd", "n"], rows))
    if found.compared.empty:
        return
    page.add("h3", "Conditions against each other")
    page.add("p", "Each pair of conditions scored on the same items: the first's final delta "
                  "minus the second's. Item SE: of the per-item difference between the two "
                  "conditions' changes (each averaged over its runs), the error from which "
                  "items the benchmark happens to hold. SE over runs: sqrt(sd1²/n1 + sd2²/n2) "
                  "from the spread over subsets, the error from which text each student saw. "
                  "A difference within about two of the larger is not shown apart from noise.")
    rows = [[found.titles.get(r.tag, r.tag), r.first, r.second, num(r.difference, True),
             num(r.item_se), f"paired, {r.n} {r.form}", num(r.runs_se)]
            for r in found.compared.itertuples()]
    page.add("table", (["task / metric", "condition", "minus condition", "difference",
                        "item SE", "SE from", "SE over runs"], rows))


def _probes(page: Page, found: Findings) -> None:
    if found.extraction.empty and found.likelihood.empty:
        return
    page.add("h2", "Memorization: extraction and log p(x | y)")
    if not found.extraction.empty:
        rows = []
        for r in found.extraction.itertuples():
            base = found.extraction_base.get((r.tag, r.condition), math.nan)
            change = relative_change(r.final_mean, base) if not math.isnan(base) else math.nan
            rows.append([found.titles.get(r.tag, r.tag), r.condition, num(base), r.final_epoch,
                         num(r.final_mean), num(r.final_sd), r.n,
                         "—" if math.isnan(change) else f"{100 * change:+.1f}%"])
        page.add("table", (["domain", "condition", "memorized at base", "final epoch",
                            "memorized", "sd", "n", "change"], rows))
    if not found.likelihood.empty:
        rows = [[found.titles.get(r.tag, r.tag), r.condition, r.final_epoch,
                 num(r.final_mean, True), num(r.final_sd), r.n]
                for r in found.likelihood.itertuples()]
        page.add("table", (["domain", "condition", "final epoch", "final Δ log p(x|y) (nats)",
                            "sd", "n"], rows))


def _proxies(page: Page, found: Findings) -> None:
    page.add("h2", "Corpus proxies beside realised gains")
    joined = found.joined
    if joined.empty:
        page.add("p", "No proxies dirs were read.")
        return
    tags = [t for t in found.benchmark["tag"].unique() if t in joined]
    threshold = f" (threshold {found.threshold:g})" if found.threshold is not None else ""
    page.add("p", "One row per run: the proxies are means over the samples of the run's own "
                  "subset (rows chosen as the data module chose them), the gain is the run's "
                  "final delta; a corpus no run trained on gets one row over all its samples. "
                  "KL(source‖student): mean over samples of (log q(x) - log p_student(x)) per "
                  "source token, q the distribution the source sampled from (tempered and "
                  "truncated, so at T ≠ 1 it is not the source model itself); — where the "
                  "corpus recorded no source log-probabilities (replay, SBP, older corpora).")
    headers = ["corpus", "subset", "proxies dir", "trained as", *(PROXIES[k] + (
               threshold if k == "fraction_above" else "") for k in PROXIES),
               *(f"final Δ {found.titles.get(t, t)}" for t in tags)]
    rows = [[r["corpus"], r["subset"], r["proxies"], r["condition"] or "no run trained on it",
             *(num(r[k]) for k in PROXIES), *(num(r.get(t, math.nan), True) for t in tags)]
            for r in joined.to_dict("records")]
    page.add("table", (headers, rows))
    page.add("h3", "Do the proxies predict the gain?")
    if found.correlations.empty:
        page.add("p", "No condition trained on a corpus with proxies: nothing to correlate.")
        return
    tests = int(found.correlations["tests"].max()) if len(found.correlations) else 0
    page.add("p", "Spearman rank correlation between each proxy and each benchmark's final delta "
                  "over the runs with proxies (subsets of one corpus share their source, so "
                  "they show within-source spread as well as between-source differences). p is "
                  "the two-sided permutation p-value; smallest p is the least that n points "
                  "allow at all; Holm p corrects for the "
                  f"{tests} correlations this report ran; the interval is 95% (Fisher z, "
                  "Bonett-Wright SE). The rules were fixed before any run: a relation is shown "
                  f"when Holm p < {ALPHA:g}; no relation only when the interval lies inside "
                  f"(-{NO_RELATION_EFFECT:g}, {NO_RELATION_EFFECT:g}); otherwise not resolved.")
    rows = [[r.proxy, found.titles.get(r.tag, r.tag), r.n, num(r.rho, True, 3),
             "—" if math.isnan(r.low) else f"[{r.low:.2f}, {r.high:.2f}]", num(r.p, False, 3),
             num(r.p_min, False, 3), num(r.p_holm, False, 3), r.method, r.verdict]
            for r in found.correlations.itertuples()]
    page.add("table", (["proxy", "gain", "n", "Spearman ρ", "95% interval", "p", "smallest p",
                        "Holm p", "p from", "what it shows"], rows))
