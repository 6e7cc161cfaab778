"""`selftrain findings`: a sweep's fits judged by the rules fixed before the run.

A report shows curves; a pre-registered test needs verdicts that nobody chose after seeing
them. This command reads one sweep (``runs/g1/<condition>/s<k>``, ``proxies/g1/<condition>``)
and applies the rules ``docs/repro-mini.md`` fixed for the paper's three findings, each fit
being the unit of analysis:

1. **Relational utility**: the paired change of the primary benchmark metric from the base at
   the last epoch, per fit; self against cross family by an exact one-sided permutation test
   over fits (4 vs 4: 70 relabellings, smallest p = 1/70), self against replay two-sided.
2. **Proxies do not predict utility**: Spearman rho over every fit between each proxy of its
   training samples (mean student NLL, mean max similarity to the benchmark items) and its
   change, permutation p, Holm over the proxies, the 95% interval of rho
   (:mod:`selftrain.analysis.evidence`), and within each synthetic source the mean change of its
   high-proxy cells minus its low-proxy cells (:mod:`selftrain.analysis.proximity_split`).
3. **Capability and memorization decouple**: per epoch, the canaries extracted as a share of
   the base's, the condition's paired benchmark change with its item SE, and held-out bits per
   byte at the last epoch against the base.

Every verdict is **shown**, **not shown** or **contradicted**, with the numbers the rule read.
A condition whose benchmark at the middle epoch beats the last by more than one paired item SE
is flagged as over-fitted. ``findings.json`` holds every number; ``findings.md`` the tables.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from selftrain.analysis.evidence import holm, permutation_p, rho_interval
from selftrain.analysis.items import Paired, items_file, metric_items, paired
from selftrain.errors import SelftrainError
from selftrain.inputs import read_json_records
from selftrain.io import atomic_dir, write_json_atomic, write_text_atomic
from selftrain.outputs import check_out_dir

SHOWN, NOT_SHOWN, CONTRADICTED = "shown", "not shown", "contradicted"
PROXY_NAMES = {"nll": "mean student NLL", "max_similarity": "mean max similarity"}
CLAIMED_SIGN = {"nll": -1, "max_similarity": 1}
"""The direction in which a proxy is claimed to predict gains: lower NLL, higher similarity."""
HIGH_CELLS = {"nll": (2, 3), "max_similarity": (1, 3)}
"""The proxy cells on each proxy's high side (0 low/low, 1 low/high, 2 high/low, 3 high/high)."""
OUT_ENTRIES = ("findings.json", "findings.md")


@dataclass
class Fit:
    """What one fit's run dir says, as the rules read it.

    Args:
        condition: the condition (``self_t1.0``).
        subset: its subset (its proxy cell, for a cells corpus).
        path: the run dir.
    """

    condition: str
    subset: int
    path: Path
    change: float = math.nan
    """The primary metric's change from the base at the last epoch."""
    change_se: float = math.nan
    """Its paired item SE."""
    last_epoch: int = 0
    extracted: dict[int, float] = field(default_factory=dict)
    """Epoch -> canaries extracted exactly."""
    damage: dict[str, float] = field(default_factory=dict)
    """Held-out metric -> its change from the base at the last epoch."""
    proxies: dict[str, float] = field(default_factory=dict)


def findings(
    sweep: str,
    out: str,
    self_condition: str = "self_t1.0",
    cross_condition: str = "gemma_t1.0",
    replay_condition: str = "replay_self_t1.0",
    benchmark: str = "selftrain_arith_large/acc",
    damage: list[str] | None = None,
    middle_epoch: int = 3,
    plant: str | None = None,
    alpha: float = 0.05,
    extraction_drop: float = 0.95,
    damage_tolerance: float = 0.03,
    no_relation_effect: float = 0.5,
    overwrite: bool = False,
) -> Path:
    """Apply the pre-registered rules to a sweep's fits; write findings.json and findings.md.

    Args:
        sweep: the sweep's ``--out`` dir (``runs/g1/<condition>/s<k>``, ``proxies/g1/...``).
        out: new dir for ``findings.json`` and ``findings.md``.
        self_condition: the self condition's name.
        cross_condition: the cross-family condition's name.
        replay_condition: the real-text replay condition's name.
        benchmark: the primary metric, ``<task>/<metric>`` as the benchmark callback logs it.
        damage: the held-out metrics of the damage check (lower is better, e.g. bits per
            byte); default: ``selftrain_bpb_pydoc`` and ``selftrain_bpb_stdlib`` bits per byte.
        middle_epoch: the epoch the over-fitting check compares with the last.
        plant: the planted base's ``plant.json``, whose damage gate is shown beside the rules.
        alpha: the significance level of every test.
        extraction_drop: the share of the base's extracted canaries that must be gone.
        damage_tolerance: the largest allowed rise of a damage metric at the last epoch.
        no_relation_effect: |rho| a 95% interval must exclude for "no relation".
        overwrite: replace an earlier findings dir at ``--out``.

    Returns:
        The output dir.
    """
    damage = damage or ["selftrain_bpb_pydoc/bits_per_byte", "selftrain_bpb_stdlib/bits_per_byte"]
    root, target = Path(sweep), Path(out)
    check_out_dir(target, overwrite, ("findings.json",), OUT_ENTRIES, "findings output")
    names = {"self": self_condition, "cross": cross_condition, "replay": replay_condition}
    fits = {role: read_fits(root, name, benchmark, damage) for role, name in names.items()}
    for role, name in names.items():
        proxies_of(root, name, fits[role])
    gate = json.loads(Path(plant).read_text()).get("gate") if plant else None
    record = {
        "sweep": str(root.resolve()), "conditions": names, "benchmark": benchmark,
        "damage": damage, "alpha": alpha,
        "finding_1": finding_one(fits, alpha),
        "finding_2": finding_two(fits, alpha, no_relation_effect),
        "finding_3": finding_three(fits, root, names, benchmark, extraction_drop,
                                   damage_tolerance),
        "over_fitting": {role: over_fitting(fits[role], benchmark, middle_epoch)
                         for role in names},
        "fits": [fit_row(fit) for role in names for fit in fits[role]],
        "plant_gate": gate,
    }
    with atomic_dir(target) as staging:
        write_json_atomic(record, staging / "findings.json", default=_plain)
        write_text_atomic(markdown(record), staging / "findings.md")
    return target


def _plain(value: Any) -> Any:
    """JSON for numpy scalars."""
    return value.item() if hasattr(value, "item") else str(value)


def read_fits(root: Path, condition: str, benchmark: str, damage: list[str]) -> list[Fit]:
    """Every fit of one condition, with its change, extraction curve and damage.

    Args:
        root: the sweep dir.
        condition: the condition's name.
        benchmark: the primary metric.
        damage: the damage metrics.
    """
    folder = root / "runs" / "g1" / condition
    runs = sorted(folder.glob("s*"), key=lambda p: int(p.name[1:]) if p.name[1:].isdigit()
                  else -1)
    if not runs:
        raise SelftrainError(f"--sweep {root}: holds no fits of condition {condition!r} "
                             f"({folder}/s<k>); name a condition the sweep trained")
    fits = []
    for path in runs:
        history = path / "eval" / "benchmark.jsonl"
        if not history.is_file():
            raise SelftrainError(f"--sweep {root}: {path} has no benchmark evaluations "
                                 f"({history}); let the sweep finish first")
        fit = Fit(condition, int(path.name[1:]), path)
        records = read_json_records(history, "--sweep")
        tag = f"benchmark_delta/{benchmark}"
        final = [r for r in records if tag in r["metrics"]]
        if not final or final[-1]["epoch"] == 0:
            raise SelftrainError(f"--benchmark {benchmark}: {history} has no change of it after "
                                 "training; name a task/metric the fit config evaluates")
        fit.last_epoch = int(final[-1]["epoch"])
        fit.change = float(final[-1]["metrics"][tag])
        change = condition_change([path], tag, 0, fit.last_epoch)
        fit.change_se = change.se if change is not None else math.nan
        base = next(r for r in records if r["epoch"] == 0)["metrics"]
        for name in damage:
            after = [r for r in records if f"benchmark/{name}" in r["metrics"]]
            if after and after[-1]["epoch"] > 0 and f"benchmark/{name}" in base:
                fit.damage[name] = (after[-1]["metrics"][f"benchmark/{name}"]
                                    - base[f"benchmark/{name}"])
        extraction = path / "eval" / "extraction.jsonl"
        for record in (read_json_records(extraction, "--sweep") if extraction.is_file()
                       else []):
            counts = [v for k, v in record["metrics"].items()
                      if k.startswith("extraction/") and k.endswith("/memorized")
                      and k.count("/") == 2]
            fit.extracted[int(record["epoch"])] = float(
                record["metrics"].get("extraction/memorized", sum(counts)))
        fits.append(fit)
    return fits


def condition_change(paths: list[Path], tag: str, before: int, after: int) -> Paired | None:
    """The paired change between two epochs of one fit, or of a condition pooled over its fits.

    From the fits' per-item files; None when one of them lacks either epoch's.
    """
    pairs = []
    for path in paths:
        first, second = items_file(path / "eval", before), items_file(path / "eval", after)
        if first is None or second is None:
            return None
        pairs.append((metric_items(pd.read_parquet(first), tag),
                      metric_items(pd.read_parquet(second), tag)))
    return paired(pairs)


def proxies_of(root: Path, condition: str, fits: list[Fit]) -> None:
    """Each fit's proxies: the means over its cell (cells corpus) or its subset's samples."""
    summary_path = root / "proxies" / "g1" / condition / "summary.json"
    if not summary_path.is_file():
        return
    summary = json.loads(summary_path.read_text())
    groups = (summary.get("cells") or {}).get("cells") or summary.get("subsets") or []
    by_subset = {group["subset"]: group for group in groups}
    for fit in fits:
        group = by_subset.get(fit.subset) or {}
        fit.proxies = {"nll": _number(group.get("nll_mean")),
                       "max_similarity": _number(group.get("max_similarity_mean")),
                       "rows": _number(group.get("rows"))}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def exact_p(first: list[float], second: list[float]) -> tuple[float, float]:
    """Exact permutation p-values of mean(first) - mean(second) over every relabelling.

    Returns:
        (one-sided p for first > second, two-sided p), each counting the observed labelling.
    """
    values = np.array([*first, *second], dtype=float)
    n, observed = len(first), float(np.mean(first) - np.mean(second))
    differences = []
    for chosen in itertools.combinations(range(len(values)), n):
        mask = np.zeros(len(values), dtype=bool)
        mask[list(chosen)] = True
        differences.append(values[mask].mean() - values[~mask].mean())
    differences = np.array(differences)
    tolerance = 1e-12 * max(1.0, float(np.abs(values).max()))
    one = float(np.mean(differences >= observed - tolerance))
    two = float(np.mean(np.abs(differences) >= abs(observed) - tolerance))
    return one, two


def between_fits(first: list[float], second: list[float]) -> dict[str, float]:
    """Difference of two conditions' mean changes, its SE over fits, and the exact p-values."""
    a, b = np.array(first, float), np.array(second, float)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    one, two = exact_p(first, second)
    return {"difference": float(a.mean() - b.mean()), "se": se, "p_one_sided": one,
            "p_two_sided": two, "n": [len(a), len(b)],
            "smallest_p": 1 / math.comb(len(a) + len(b), len(a))}


def changes(fits: list[Fit]) -> list[float]:
    """The fits' primary changes."""
    return [fit.change for fit in fits]


def finding_one(fits: dict[str, list[Fit]], alpha: float) -> dict[str, Any]:
    """Self above cross family (one-sided), not below replay; contradicted by either above."""
    cross = between_fits(changes(fits["self"]), changes(fits["cross"]))
    replay = between_fits(changes(fits["self"]), changes(fits["replay"]))
    if ((cross["difference"] < 0 and cross["p_two_sided"] < alpha)
            or (replay["difference"] < 0 and replay["p_two_sided"] < alpha)):
        verdict = CONTRADICTED
    elif cross["p_one_sided"] < alpha and not (replay["difference"] < 0
                                               and replay["p_two_sided"] < alpha):
        verdict = SHOWN
    else:
        verdict = NOT_SHOWN
    means = {role: float(np.mean(changes(group))) for role, group in fits.items()}
    return {"self_minus_cross": cross, "self_minus_replay": replay, "means": means,
            "verdict": verdict}


def finding_two(fits: dict[str, list[Fit]], alpha: float, effect: float) -> dict[str, Any]:
    """Rank tests of each proxy against the change over every fit, and within sources."""
    every = [fit for group in fits.values() for fit in group]
    tests = {}
    for proxy in PROXY_NAMES:
        x = np.array([fit.proxies.get(proxy, math.nan) for fit in every], float)
        y = np.array(changes(every), float)
        keep = np.isfinite(x) & np.isfinite(y)
        rho = float(spearmanr(x[keep], y[keep]).statistic) if keep.sum() >= 3 else math.nan
        p, how = permutation_p(x[keep], y[keep]) if keep.sum() >= 3 else (math.nan, "")
        within = {}
        for role in ("self", "cross"):
            high = [f.change for f in fits[role] if f.subset in HIGH_CELLS[proxy]]
            low = [f.change for f in fits[role] if f.subset not in HIGH_CELLS[proxy]]
            within[role] = (float(np.mean(high) - np.mean(low)) if high and low else math.nan)
        tests[proxy] = {"n": int(keep.sum()), "rho": rho, "p": p, "p_method": how,
                        "interval": rho_interval(rho, int(keep.sum())),
                        "high_minus_low_within": within}
    for proxy, adjusted in zip(tests, holm([t["p"] for t in tests.values()]), strict=True):
        tests[proxy]["p_holm"] = adjusted
    predicts = [proxy for proxy, t in tests.items()
                if t["p_holm"] < alpha and np.sign(t["rho"]) == CLAIMED_SIGN[proxy]
                and all(np.sign(v) == CLAIMED_SIGN[proxy]
                        for v in t["high_minus_low_within"].values())]
    excluded = all(t["p_holm"] >= alpha and -effect < t["interval"][0]
                   and t["interval"][1] < effect for t in tests.values())
    verdict = CONTRADICTED if predicts else SHOWN if excluded else NOT_SHOWN
    return {"tests": tests, "predicting": predicts, "verdict": verdict}


def decoupling(fits: list[Fit], paths_change: Paired | None, drop: float, tolerance: float
               ) -> dict[str, Any]:
    """One condition under finding 3's rule: extraction gone and stays gone, benchmark held."""
    epochs = sorted(set.intersection(*(set(fit.extracted) for fit in fits)))
    base = np.mean([fit.extracted[0] for fit in fits]) if 0 in epochs else math.nan
    share = {e: float(np.mean([fit.extracted[e] for fit in fits]) / base) if base else math.nan
             for e in epochs}
    ceiling = 1 - drop
    gone = [e for e in epochs if e > 0 and share[e] <= ceiling + 1e-12]
    first = gone[0] if gone else None
    stays = first is not None and all(share[e] <= ceiling + 1e-12 for e in epochs if e >= first)
    change = paths_change.delta if paths_change else float(np.mean(changes(fits)))
    se = paths_change.se if paths_change else math.nan
    damage = {name: float(np.mean([fit.damage[name] for fit in fits if name in fit.damage]))
              for name in sorted({n for fit in fits for n in fit.damage})}
    held = not math.isnan(se) and change >= -se
    whole = bool(damage) and all(value <= tolerance for value in damage.values())
    falls_with = (not math.isnan(se) and change < -2 * se and epochs
                  and share[epochs[-1]] <= ceiling + 1e-12)
    verdict = (SHOWN if first is not None and stays and held and whole
               else CONTRADICTED if falls_with else NOT_SHOWN)
    return {"base_extracted": base, "share_of_base": share, "gone_from_epoch": first,
            "stays_gone": stays, "change": change, "change_se": se, "benchmark_held": held,
            "damage": damage, "damage_within": whole, "verdict": verdict}


def finding_three(fits: dict[str, list[Fit]], root: Path, names: dict[str, str],
                  benchmark: str, drop: float, tolerance: float) -> dict[str, Any]:
    """Finding 3 under self, and the same rule applied to the other conditions."""
    tag = f"benchmark_delta/{benchmark}"
    result = {}
    for role, group in fits.items():
        last = min(fit.last_epoch for fit in group)
        pooled = condition_change([fit.path for fit in group], tag, 0, last)
        result[role] = decoupling(group, pooled, drop, tolerance)
    general = [names[role] for role in ("cross", "replay") if result[role]["verdict"] == SHOWN]
    return {"by_condition": result, "verdict": result["self"]["verdict"],
            "also_decoupled": general}


def over_fitting(fits: list[Fit], benchmark: str, middle: int) -> dict[str, Any]:
    """The condition's paired change from the middle epoch to the last; flagged below -1 SE."""
    last = min(fit.last_epoch for fit in fits)
    change = condition_change([fit.path for fit in fits], f"benchmark_delta/{benchmark}",
                              middle, last)
    if change is None:
        return {"middle_epoch": middle, "last_epoch": last, "change": None, "flagged": None}
    return {"middle_epoch": middle, "last_epoch": last, "change": change.delta,
            "se": change.se, "flagged": bool(change.delta < -change.se)}


def fit_row(fit: Fit) -> dict[str, Any]:
    """One fit's numbers for findings.json."""
    return {"condition": fit.condition, "subset": fit.subset, "run": str(fit.path),
            "change": fit.change, "change_se": fit.change_se, "last_epoch": fit.last_epoch,
            "extracted": fit.extracted, "damage": fit.damage, "proxies": fit.proxies}


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if isinstance(value, float) else str(value)


def markdown(record: dict[str, Any]) -> str:
    """findings.md: the verdict table first, then what each rule read."""
    one, two, three = record["finding_1"], record["finding_2"], record["finding_3"]
    names, metric = record["conditions"], record["benchmark"]
    cross, replay = one["self_minus_cross"], one["self_minus_replay"]
    self3 = three["by_condition"]["self"]
    gone = self3["gone_from_epoch"]
    rows = [
        ("1. relational utility",
         f"self − cross > 0 at one-sided exact p < {record['alpha']} over fits, self not "
         "below replay (two-sided); contradicted if cross or replay is above self",
         f"Δ {metric}: self − cross {_f(cross['difference'])} ± {cross['se']:.3f} "
         f"(p one-sided {cross['p_one_sided']:.3f}); self − replay "
         f"{_f(replay['difference'])} ± {replay['se']:.3f} (p two-sided "
         f"{replay['p_two_sided']:.3f})", one["verdict"]),
        ("2. proxies do not predict",
         "contradicted if a proxy's rho has the claimed sign at Holm p < alpha and the "
         "within-source cell difference agrees in both synthetic sources; shown if both Holm "
         "p >= alpha and both 95% intervals inside (−0.5, 0.5)",
         "; ".join(f"{PROXY_NAMES[p]}: ρ {_f(t['rho'], 2)} [{t['interval'][0]:.2f}, "
                   f"{t['interval'][1]:.2f}], Holm p {t['p_holm']:.3f} (n = {t['n']})"
                   for p, t in two["tests"].items()), two["verdict"]),
        ("3. capability and memorization decouple",
         "under self, extraction falls >= 95% of the base's at some epoch and stays there, "
         "the paired benchmark change >= −1 item SE, held-out bits per byte within +0.03",
         f"extracted share of base at the last epoch "
         f"{self3['share_of_base'].get(max(self3['share_of_base']), math.nan):.3f} "
         f"(gone from epoch {gone if gone is not None else '–'}); Δ {metric} "
         f"{_f(self3['change'])} ± {self3['change_se']:.3f}; bits per byte "
         + ", ".join(f"{name.split('/')[0]} {_f(v)}" for name, v in self3["damage"].items()),
         three["verdict"]),
    ]
    lines = ["# Findings of the run, by the pre-registered rules", "",
             "Written by `selftrain findings` from the sweep's fits; the rules are those of "
             "docs/repro-mini.md, fixed before the run. ± is one standard error (between fits "
             "for finding 1, over items for finding 3).", "",
             "| finding | rule | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | **{d}** |" for a, b, c, d in rows]
    if three["also_decoupled"]:
        lines += ["", "The decoupling rule also holds under " + ", ".join(
            three["also_decoupled"]) + ": it belongs to fine-tuning in general, not to "
            "self-generated data."]
    lines += ["", "## Per fit", "",
              f"| condition | subset (cell) | rows | mean NLL | mean max sim. | Δ {metric} ± "
              "item SE | extracted per epoch |", "|---|---|---|---|---|---|---|"]
    for fit in record["fits"]:
        extracted = " ".join(f"{int(v)}" for _, v in sorted(fit["extracted"].items()))
        proxies = fit["proxies"]
        lines.append(f"| {fit['condition']} | {fit['subset']} | "
                     f"{_f(proxies.get('rows'), 0).lstrip('+')} | "
                     f"{proxies.get('nll', math.nan):.3f} | "
                     f"{proxies.get('max_similarity', math.nan):.3f} | "
                     f"{_f(fit['change'])} ± {fit['change_se']:.3f} | {extracted} |")
    lines += ["", "## Finding 3 by condition", "",
              "| condition | extracted share of base, per epoch | Δ ± item SE (last epoch) | "
              "bits per byte change | verdict |", "|---|---|---|---|---|"]
    for role, result in three["by_condition"].items():
        shares = " ".join(f"{v:.2f}" for _, v in sorted(result["share_of_base"].items()))
        damage = ", ".join(f"{_f(v)}" for v in result["damage"].values())
        lines.append(f"| {names[role]} | {shares} | {_f(result['change'])} ± "
                     f"{result['change_se']:.3f} | {damage} | {result['verdict']} |")
    lines += ["", "## Over-fitting check (middle epoch against the last)", "",
              "| condition | change from the middle epoch to the last ± item SE | flagged |",
              "|---|---|---|"]
    for role, check in record["over_fitting"].items():
        if check["change"] is None:
            lines.append(f"| {names[role]} | – | – |")
        else:
            lines.append(f"| {names[role]} | {_f(check['change'])} ± {check['se']:.3f} "
                         f"(epoch {check['middle_epoch']} -> {check['last_epoch']}) | "
                         f"{'yes' if check['flagged'] else 'no'} |")
    gate = record.get("plant_gate")
    if gate:
        lines += ["", "## The planted base against the unplanted model (damage gate)", "",
                  "| metric | unplanted | planted | allowed worse by | rule | passed |",
                  "|---|---|---|---|---|---|"]
        for name, metric_row in gate["metrics"].items():
            allowed = metric_row.get("allowed")
            lines.append(f"| {name} | {metric_row['before']:.4f} | {metric_row['after']:.4f} | "
                         f"{'–' if allowed is None else f'{allowed:.4f}'} | "
                         f"{metric_row.get('rule', '')} | "
                         f"{'yes' if metric_row['passed'] else 'no'} |")
    return "\n".join(lines) + "\n"
