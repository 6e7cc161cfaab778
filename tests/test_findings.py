"""`selftrain findings`: the pre-registered rules give the verdict the numbers call for.

Sweeps are laid out as ``selftrain sweep`` writes them (run dirs with ``eval/benchmark.jsonl``,
per-item parquet files, ``eval/extraction.jsonl``; proxies dirs with their cells), with the
numbers chosen so that each rule must come out one way: a clear self advantage with
extraction gone is shown; cross family far above self contradicts finding 1, a proxy that
orders every fit contradicts finding 2, and extraction that only halves does not show
finding 3. The exact permutation test is checked against its counting definition.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selftrain.analysis.findings import exact_p, findings
from selftrain.callbacks.benchmark_results import ITEM_SCHEMA
from selftrain.cli import main

ITEMS = 100
TASK, METRIC = "selftrain_arith_large", "acc"
CONDITIONS = {"self": "self_t1.0", "cross": "gemma_t1.0", "replay": "replay_self_t1.0"}


def items_table(correct: int, bits: float) -> pa.Table:
    """Per-item rows: the first ``correct`` of ITEMS right; one bits-per-byte document."""
    rows = [{"task": TASK, "doc_id": i, "filter": "none", "metric": METRIC,
             "aggregation": "mean", "value": float(i < correct), "weight": 1.0,
             "target": None, "loglikelihoods": None, "answer": None} for i in range(ITEMS)]
    rows += [{"task": "selftrain_bpb_pydoc", "doc_id": d, "filter": "none",
              "metric": "bits_per_byte", "aggregation": "bits_per_byte",
              "value": -bits * math.log(2) * 100, "weight": 100.0, "target": None,
              "loglikelihoods": None, "answer": None} for d in range(2)]
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def write_fit(run: Path, gains: dict[int, int], extracted: list[int], bits: float) -> None:
    """One fit: base 50/100 right, ``gains[epoch]`` more right after it; its curves."""
    (run / "eval" / "benchmark").mkdir(parents=True)
    records = []
    for epoch, gain in {0: 0, **gains}.items():
        step = epoch * 10
        after_bits = 1.0 + (bits if epoch == max(gains) else 0.0)
        pq.write_table(items_table(50 + gain, after_bits),
                       run / "eval" / "benchmark" / f"epoch={epoch}-step={step}.items.parquet")
        metrics = {f"benchmark/{TASK}/{METRIC}": (50 + gain) / ITEMS,
                   f"benchmark_delta/{TASK}/{METRIC}": gain / ITEMS}
        if epoch in (0, max(gains)):
            metrics["benchmark/selftrain_bpb_pydoc/bits_per_byte"] = after_bits
        records.append({"epoch": epoch, "global_step": step, "seconds": 1.0,
                        "metrics": metrics})
    (run / "eval" / "benchmark.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "eval" / "extraction.jsonl").write_text("".join(
        json.dumps({"epoch": e, "global_step": e * 10, "seconds": 1.0,
                    "metrics": {"extraction/code/memorized": float(n),
                                "extraction/license/memorized": 0.0}}) + "\n"
        for e, n in enumerate(extracted)))


def write_sweep(root: Path, gains: dict[str, list[int]], extracted: dict[str, list[int]],
                nll: dict[str, list[float]], bits: float = 0.0) -> Path:
    """A sweep of 3 conditions x 4 fits with these last-epoch gains (items) and proxies."""
    for role, condition in CONDITIONS.items():
        for k, gain in enumerate(gains[role]):
            write_fit(root / "runs" / "g1" / condition / f"s{k}", {3: gain, 6: gain},
                      extracted[role], bits)
        groups = [{"subset": k, "rows": 16, "nll_mean": nll[role][k],
                   "max_similarity_mean": 0.2 + 0.01 * ((k * 7 + len(role)) % 4)}
                  for k in range(4)]
        summary = {"format": "selftrain-proxies/1", "subsets": groups}
        if role != "replay":
            summary["cells"] = {"corpus": str(root / "cells" / condition), "cells": groups}
        folder = root / "proxies" / "g1" / condition
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
    return root


def verdicts(out: Path) -> list[str]:
    record = json.loads((out / "findings.json").read_text())
    return [record[f"finding_{n}"]["verdict"] for n in (1, 2, 3)]


def test_exact_p_counts_every_relabelling():
    assert exact_p([5, 6, 7, 8], [1, 2, 3, 4]) == (pytest.approx(1 / 70), pytest.approx(2 / 70))
    assert exact_p([1, 2, 3, 4], [5, 6, 7, 8])[0] == 1.0
    one, two = exact_p([1, 2, 3, 5], [0, 4, 6, -1])
    assert 0 < one < 1 and one <= two


def test_a_clear_self_advantage_with_extraction_gone_is_shown(tmp_path):
    sweep = write_sweep(tmp_path / "sweep",
                        gains={"self": [10, 11, 12, 13], "cross": [0, 1, -1, 2],
                               "replay": [9, 12, 10, 11]},
                        extracted={"self": [29, 0, 0, 0, 0, 0, 0],
                                   "cross": [29, 20, 15, 15, 14, 14, 14],
                                   "replay": [29, 3, 1, 0, 0, 0, 0]},
                        nll={"self": [1.0, 1.1, 2.0, 2.1], "cross": [3.0, 3.1, 4.0, 4.1],
                             "replay": [2.5, 2.6, 2.4, 2.7]})
    gate = {"passed": True, "metrics": {
        "selftrain_bpb_pydoc/bits_per_byte": {"before": 0.99, "after": 0.95, "allowed": 0.03,
                                              "rule": "tolerance", "passed": True},
        "selftrain_bpb_pydoc/word_perplexity": {"before": 99.8, "after": 84.1, "allowed": None,
                                                "rule": "not gated: no item SE",
                                                "passed": True}}}
    plant = tmp_path / "plant.json"
    plant.write_text(json.dumps({"gate": gate}))
    out = findings(str(sweep), str(tmp_path / "out"), plant=str(plant))
    record = json.loads((out / "findings.json").read_text())
    assert "| selftrain_bpb_pydoc/bits_per_byte | 0.9900 | 0.9500 | 0.0300 |" in (
        out / "findings.md").read_text()
    one = record["finding_1"]
    assert one["verdict"] == "shown"
    assert one["self_minus_cross"]["p_one_sided"] == pytest.approx(1 / 70)
    assert one["self_minus_cross"]["difference"] == pytest.approx(0.11)
    three = record["finding_3"]
    assert three["verdict"] == "shown" and three["by_condition"]["self"]["gone_from_epoch"] == 1
    assert three["by_condition"]["cross"]["verdict"] == "not shown"  # half the canaries stay
    assert three["also_decoupled"] == ["replay_self_t1.0"]  # replay decouples too: said
    assert "belongs to fine-tuning in general" in (out / "findings.md").read_text()
    assert record["over_fitting"]["self"]["flagged"] is False
    assert len(record["fits"]) == 12 and record["finding_2"]["tests"]["nll"]["n"] == 12


def test_cross_above_self_a_predicting_proxy_and_half_extraction(tmp_path):
    gains = {"self": [3, 2, 1, 0], "cross": [23, 22, 21, 20], "replay": [4, 5, 6, 7]}
    # NLL orders every fit against its gain (lower NLL, larger gain), within each source too:
    # cells 0 and 1 are a source's low-NLL half
    nll = {role: [10.0 - g / 10 for g in values] for role, values in gains.items()}
    sweep = write_sweep(tmp_path / "sweep", gains=gains, nll=nll,
                        extracted={role: [30, 15, 15, 15, 15, 15, 15] for role in CONDITIONS})
    out = tmp_path / "out"
    main(["findings", "--sweep", str(sweep), "--out", str(out)])
    assert verdicts(out) == ["contradicted", "contradicted", "not shown"]
    record = json.loads((out / "findings.json").read_text())
    assert record["finding_2"]["predicting"] == ["nll"]
    assert record["finding_2"]["tests"]["nll"]["rho"] == pytest.approx(-1.0)


def test_damage_beyond_the_tolerance_keeps_finding_three_from_shown(tmp_path):
    sweep = write_sweep(tmp_path / "sweep",
                        gains={role: [10, 11, 12, 13] for role in CONDITIONS},
                        extracted={role: [29, 0, 0, 0, 0, 0, 0] for role in CONDITIONS},
                        nll={role: [1.0, 2.0, 3.0, 4.0] for role in CONDITIONS}, bits=0.05)
    out = findings(str(sweep), str(tmp_path / "out"))
    record = json.loads((out / "findings.json").read_text())
    self3 = record["finding_3"]["by_condition"]["self"]
    assert self3["damage"]["selftrain_bpb_pydoc/bits_per_byte"] == pytest.approx(0.05)
    assert self3["damage_within"] is False and record["finding_3"]["verdict"] == "not shown"


def test_a_condition_the_sweep_did_not_train_is_one_line(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep",
                        gains={role: [1, 2, 3, 4] for role in CONDITIONS},
                        extracted={role: [2, 1, 0, 0, 0, 0, 0] for role in CONDITIONS},
                        nll={role: [1.0, 2.0, 3.0, 4.0] for role in CONDITIONS})
    with pytest.raises(SystemExit) as stop:
        main(["findings", "--sweep", str(sweep), "--out", str(tmp_path / "out"),
              "--cross_condition", "llama_t1.0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'llama_t1.0'" in err[0] and "--sweep" in err[0]
    assert not (tmp_path / "out").exists()
