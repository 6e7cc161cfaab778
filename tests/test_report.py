"""`selftrain report`: runs grouped into conditions, numbers checked against what was logged.

Most tests write TensorBoard event files directly (``SummaryWriter``) beside a minimal
``tb/config.yaml`` and corpus manifests, so they take a second; the numbers the summary quotes
are recomputed here with numpy from the values logged, never through the report's own code.
One slow test fits the debug config for real (2 conditions x 2 subsets) and reads it back.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO

from selftrain.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ("facts/acc", "facts/acc_norm", "arith/exact_match")


def corpus_dir(root: Path, name: str, temperature: float = 1.0, source: str = "tiny:qwen2",
               kind: str = "synthetic") -> Path:
    """A corpus dir with only its manifest (the report reads nothing else)."""
    path = root / "corpora" / name
    path.mkdir(parents=True)
    manifest = {"kind": kind, "source": {"model": source},
                "sampling": {"temperature": temperature}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def write_run(path: Path, corpus: Path | str, subset: int, series: dict[str, list[float]],
              student: str = "tiny:qwen2", steps_per_epoch: int = 7) -> Path:
    """A run dir: tb/config.yaml and event files holding one value per epoch per tag."""
    from torch.utils.tensorboard import SummaryWriter

    tb = path / "tb"
    tb.mkdir(parents=True)
    epochs = len(next(iter(series.values()))) - 1
    config = {"model": {"model": student, "lr": 0.003},
              "data": {"corpus": str(corpus), "subset": subset, "num_subsets": 2},
              "trainer": {"default_root_dir": str(path), "max_epochs": epochs,
                          "logger": {"init_args": {"save_dir": str(path)}}}}
    (tb / "config.yaml").write_text(yaml.safe_dump(config))
    writer = SummaryWriter(str(tb))
    for epoch in range(epochs + 1):
        step = epoch * steps_per_epoch
        if epoch:
            for inner in range(step - steps_per_epoch + 1, step + 1):
                writer.add_scalar("train/loss", 5.0 - inner / 100, inner)
        writer.add_scalar("eval/epochs_completed", float(epoch), step)
        for tag, values in series.items():
            writer.add_scalar(tag, values[epoch], step)
    writer.close()
    return path


def random_series(rng: np.random.Generator, epochs: int = 4, tasks=TASKS) -> dict:
    """Benchmark deltas (0 at epoch 0), extraction counts and log p deltas per domain."""
    series = {}
    for task in tasks:
        series[f"benchmark_delta/{task}"] = [0.0, *rng.normal(0.02, 0.05, epochs).round(4)]
        series[f"benchmark/{task}"] = [0.3 + v for v in series[f"benchmark_delta/{task}"]]
        if task.startswith("facts/"):  # lm-eval's stderr over items, as bootstrap_iters > 0 logs
            series[f"benchmark_stderr/{task}"] = [*rng.uniform(0.01, 0.05, epochs + 1).round(4)]
    for domain in ("code", "license"):
        series[f"extraction/{domain}/memorized"] = [20.0, *rng.integers(0, 20, epochs)]
        series[f"likelihood/{domain}/delta_logprob"] = [0.0, *rng.normal(-2, 1, epochs)]
    return series


def run_report(*args: str) -> None:
    main(["report", *args])


def table_rows(summary: str, first_cell: str) -> list[list[str]]:
    """The cells of every Markdown table row whose first cell is ``first_cell``."""
    rows = []
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


@pytest.fixture
def two_conditions(tmp_path):
    """Two temperatures x two subsets; returns (runs root, {(temperature, subset): series})."""
    rng = np.random.default_rng(0)
    logged = {}
    for temperature in (0.75, 1.25):
        corpus = corpus_dir(tmp_path, f"t{temperature}", temperature)
        for subset in (0, 1):
            series = random_series(rng)
            write_run(tmp_path / "runs" / f"t{temperature}_s{subset}", corpus, subset, series)
            logged[(temperature, subset)] = series
    return tmp_path / "runs", logged


def test_summary_quotes_final_and_best_deltas_computed_from_the_logged_values(
        two_conditions, tmp_path):
    runs, logged = two_conditions
    out = tmp_path / "report"
    run_report("--runs", f"[{runs}]", "--out", str(out))
    summary = (out / "summary.md").read_text()
    for temperature in (0.75, 1.25):
        condition = f"T={temperature:g}"
        for task in TASKS:
            values = np.array([logged[(temperature, s)][f"benchmark_delta/{task}"]
                               for s in (0, 1)])
            mean, sd = values.mean(axis=0), values.std(axis=0, ddof=1)
            best = 1 + int(np.argmax(mean[1:]))
            name, metric = task.split("/")
            row = [r for r in table_rows(summary, f"{name}: {metric}") if r[1] == condition]
            assert len(row) == 1, (condition, task, summary)
            (_, _, final_epoch, final, final_sd, item_se, se_from, n, best_epoch, best_mean,
             best_sd, best_n) = row[0]
            assert (int(final_epoch), int(n), int(best_n)) == (4, 2, 2)
            if task.startswith("facts/"):  # these runs kept no per-item results
                stderr = [logged[(temperature, s)][f"benchmark_stderr/{task}"][-1] for s in (0, 1)]
                assert float(item_se) == pytest.approx(np.mean(stderr), rel=1e-3)
                assert se_from == "score SE, unpaired"
            else:
                assert item_se == se_from == "—"
            assert float(final) == pytest.approx(mean[-1], rel=1e-3, abs=1e-6)
            assert float(final_sd) == pytest.approx(sd[-1], rel=1e-3, abs=1e-6)
            assert int(best_epoch) == best
            assert float(best_mean) == pytest.approx(mean[best], rel=1e-3, abs=1e-6)
            assert float(best_sd) == pytest.approx(sd[best], rel=1e-3, abs=1e-6)
        counts = np.array([logged[(temperature, s)]["extraction/code/memorized"] for s in (0, 1)])
        row = [r for r in table_rows(summary, "code") if r[1] == condition][0]
        assert float(row[2]) == counts[:, 0].mean() and float(row[4]) == counts[:, -1].mean()
        assert row[7] == f"{100 * (counts[:, -1].mean() - 20) / 20:+.1f}%"
    scalars = (out / "scalars.csv").read_text()
    assert "train/loss" not in scalars and "benchmark_delta/facts/acc" in scalars


def test_every_figure_is_a_png_with_one_panel_per_metric(two_conditions, tmp_path):
    from matplotlib.image import imread

    runs, _ = two_conditions
    out = tmp_path / "report"
    run_report("--runs", f"[{runs}]", "--out", str(out))
    drawn = {d["file"]: d for d in json.loads((out / "figures.json").read_text())}
    assert drawn["benchmark_delta.png"]["panels"] == [
        "arith: exact_match", "facts: acc", "facts: acc_norm"]
    assert drawn["extraction.png"]["panels"] == ["code", "license"]
    assert drawn["likelihood.png"]["panels"] == ["code", "license"]
    assert "base model (0)" in drawn["benchmark_delta.png"]["legend"]
    assert all("n=2 subsets" in label for label in drawn["benchmark_delta.png"]["legend"]
               if label.startswith("T="))
    for name in drawn:
        path = out / "figures" / name
        assert path.read_bytes()[:8] == PNG
        height, width, _ = imread(path).shape
        assert width > 400 and height > 300
        assert f"figures/{name}" in (out / "summary.md").read_text()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.urls += [(tag, name, value or "") for name, value in attrs
                      if name in ("src", "href")]


def test_report_html_is_self_contained(two_conditions, tmp_path):
    runs, _ = two_conditions
    out = tmp_path / "report"
    run_report("--runs", f"[{runs}]", "--out", str(out))
    page = (out / "report.html").read_text()
    parser = _Links()
    parser.feed(page)
    parser.close()
    assert {"html", "table", "img", "figure"} <= parser.tags
    assert not {"script", "link", "iframe"} & parser.tags
    images = [value for tag, name, value in parser.urls if tag == "img"]
    assert len(images) == 3 and all(v.startswith("data:image/png;base64,") for v in images)
    assert not [value for _, _, value in parser.urls if re.match(r"https?:", value)]
    assert not re.search(r"https?://", page)


def test_one_subset_draws_no_band_and_says_so(tmp_path):
    corpus = corpus_dir(tmp_path, "c")
    write_run(tmp_path / "runs" / "only", corpus, 0, random_series(np.random.default_rng(1)))
    out = tmp_path / "report"
    run_report("--runs", f"[{tmp_path / 'runs' / 'only'}]", "--out", str(out))
    drawn = json.loads((out / "figures.json").read_text())
    assert all(any("1 subset: no band" in label for label in d["legend"]) for d in drawn)
    row = table_rows((out / "summary.md").read_text(), "facts: acc")[0]
    assert row[4] == "—" and row[7] == "1"  # sd undefined, n = 1


def test_conditions_group_subsets_and_can_be_named(tmp_path, capsys):
    rng = np.random.default_rng(2)
    corpus = corpus_dir(tmp_path, "c", 1.0)
    runs = tmp_path / "runs"
    for subset in (0, 1):
        write_run(runs / f"s{subset}", corpus, subset, random_series(rng))
    write_run(runs / "other_lr", corpus, 0, random_series(rng))
    config = yaml.safe_load((runs / "other_lr/tb/config.yaml").read_text())
    config["model"]["lr"] = 0.01
    (runs / "other_lr/tb/config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "report"
    run_report("--runs", f"[{runs}]", "--out", str(out))
    summary = (out / "summary.md").read_text()
    names = {row[1] for row in table_rows(summary, "facts: acc")}
    assert names == {"tiny:qwen2 <- tiny:qwen2 T=1 synthetic (model.lr=0.003)",
                     "tiny:qwen2 <- tiny:qwen2 T=1 synthetic (model.lr=0.01)"}
    run_report("--runs", f"[{runs}]", "--out", str(tmp_path / "named"), "--conditions",
               f"{{{runs / 's0'}: mine, {runs / 's1'}: mine, {runs / 'other_lr'}: theirs}}")
    named = (tmp_path / "named" / "summary.md").read_text()
    assert {row[1] for row in table_rows(named, "facts: acc")} == {"mine", "theirs"}
    assert [row[7] for row in table_rows(named, "facts: acc")] == ["2", "1"]


def test_moved_corpus_falls_back_to_its_path_name(tmp_path):
    corpus = corpus_dir(tmp_path, "qwen_t1", 1.0)
    write_run(tmp_path / "runs" / "a", corpus, 0, random_series(np.random.default_rng(3)))
    (corpus / "manifest.json").unlink()
    out = tmp_path / "report"
    run_report("--runs", f"[{tmp_path / 'runs'}]", "--out", str(out))
    summary = (out / "summary.md").read_text()
    assert "corpus qwen_t1" in summary
    assert "manifest.json not readable (moved?)" in summary


def test_runs_with_different_tasks_are_reported_on_the_tasks_they_share(tmp_path, caplog):
    rng = np.random.default_rng(4)
    corpus = corpus_dir(tmp_path, "c")
    write_run(tmp_path / "runs" / "a", corpus, 0, random_series(rng))
    write_run(tmp_path / "runs" / "b", corpus, 1, random_series(rng, tasks=TASKS[:2]))
    out = tmp_path / "report"
    run_report("--runs", f"[{tmp_path / 'runs'}]", "--out", str(out))
    summary = (out / "summary.md").read_text()
    assert "benchmark_delta/arith/exact_match: not logged by runs/b" in summary.replace(
        str(tmp_path) + "/", "")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("arith/exact_match: not logged by" in line for line in warned)  # on stderr
    drawn = {d["file"]: d for d in json.loads((out / "figures.json").read_text())}
    assert drawn["benchmark_delta.png"]["panels"] == ["facts: acc", "facts: acc_norm"]


def proxies_dir(root: Path, name: str, corpus: Path, similarity: float, nll: float,
                rng: np.random.Generator) -> Path:
    """A `selftrain proxies` output written directly: samples.parquet and summary.json."""
    import pandas as pd

    path = root / "proxies" / name
    path.mkdir(parents=True)
    rows = 40
    sims = {b: np.clip(rng.normal(similarity, 0.05, rows), -1, 1) for b in ("facts", "arith")}
    samples = pd.DataFrame({"id": range(rows), "subset": [i % 2 for i in range(rows)],
                            **{f"max_similarity/{b}": v for b, v in sims.items()},
                            "max_similarity": np.maximum(*sims.values()),
                            "nll": rng.normal(nll, 0.3, rows)})
    samples.to_parquet(path / "samples.parquet")

    def stats(values):
        counts, edges = np.histogram(values, bins=20)
        return {"mean": float(values.mean()), "std": float(values.std()),
                "quantiles": {str(q): float(np.quantile(values, q))
                              for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
                "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}

    top = samples["max_similarity"].to_numpy()
    summary = {"format": "selftrain-proxies/1", "corpus": str(corpus.resolve()),
               "corpus_kind": "synthetic", "source_model": "tiny:qwen2",
               "temperature": float(name[1:]), "rows": rows, "embedding_model": "mini",
               "threshold": 0.35,
               "benchmarks": {b: {"items": 8, "max_similarity": stats(v),
                                  "fraction_above": float((v >= 0.35).mean())}
                              for b, v in sims.items()},
               "max_similarity": stats(top), "fraction_above": float((top >= 0.35).mean()),
               "student": "tiny:qwen2", "nll": stats(samples["nll"].to_numpy()), "split": None,
               "timing": {}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_proxies_sit_beside_gains_one_point_per_run_with_an_honest_rank_correlation(tmp_path):
    """Each run's proxies are its own subset's means, its gain its own final delta."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(5)
    dirs, finals, sims = [], [], []
    for i, temperature in enumerate((0.5, 0.75, 1.0, 1.25)):
        corpus = corpus_dir(tmp_path, f"t{temperature}", temperature)
        dirs.append(proxies_dir(tmp_path, f"t{temperature}", corpus, 0.2 + 0.05 * i, 9 - i, rng))
        samples = pd.read_parquet(dirs[-1] / "samples.parquet")
        for subset in (0, 1):
            series = random_series(rng)
            write_run(tmp_path / "runs" / f"t{temperature}_{subset}", corpus, subset, series)
            finals.append(series["benchmark_delta/facts/acc"][-1])
            sims.append(samples["max_similarity"].to_numpy()[subset::2].mean())  # row i % 2
    out = tmp_path / "report"
    run_report("--runs", f"[{tmp_path / 'runs'}]", "--out", str(out), "--proxies",
               "[" + ", ".join(map(str, dirs)) + "]")
    summary = (out / "summary.md").read_text()
    row = [r for r in table_rows(summary, "mean max similarity") if r[1] == "facts: acc"][0]
    x, y = rankdata(sims), rankdata(finals)
    rho = np.corrcoef(x, y)[0, 1]
    orderings = np.array(list(itertools.permutations(y)))  # all 8! orderings of the gains
    centred = orderings - orderings.mean(axis=1, keepdims=True)
    null = centred @ (x - x.mean()) / np.sqrt((centred ** 2).sum(axis=1) * ((x - x.mean()) ** 2)
                                              .sum())
    p = np.mean(np.abs(null) >= abs(rho) - 1e-12)
    assert row[2] == "8"  # 4 corpora x 2 subsets
    assert float(row[3]) == pytest.approx(rho, abs=1e-3)
    assert float(row[5]) == pytest.approx(p, abs=1e-3)
    assert float(row[6]) == pytest.approx(2 / math.factorial(8), rel=1e-2)
    beside = table_rows(summary, "tiny:qwen2 T=0.5 synthetic")
    assert [r[1] for r in beside] == ["0", "1"]
    assert [float(r[4]) for r in beside] == pytest.approx(sims[:2], rel=1e-3)
    (header,) = [line for line in summary.splitlines() if line.startswith("| corpus | subset")]
    gain = [c.strip() for c in header.strip("|").split("|")].index("final Δ facts: acc")
    assert [float(r[gain]) for r in beside] == pytest.approx(finals[:2], rel=1e-3, abs=1e-6)
    assert all(r[7] == "—" for r in beside)  # no source log-probabilities in these corpora
    drawn = {d["file"]: d for d in json.loads((out / "figures.json").read_text())}
    assert drawn["similarity.png"]["panels"] == ["arith", "facts"]
    assert "threshold 0.35" in drawn["similarity.png"]["legend"]
    assert drawn["nll_kde.png"]["panels"] == ["scored by tiny:qwen2"]
    assert "proxies_vs_gain.png" in drawn
    for name in drawn:
        assert (out / "figures" / name).read_bytes()[:8] == PNG


def refused(capsys, *args: str) -> str:
    """Run the report, expect exit 2 and one line on stderr; return it."""
    capsys.readouterr()  # what earlier commands of the test logged
    with pytest.raises(SystemExit) as exit_info:
        run_report(*args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selftrain: error: --"), lines
    return lines[0]


def test_bad_inputs_get_one_line_and_write_nothing(tmp_path, capsys):
    rng = np.random.default_rng(6)
    corpus = corpus_dir(tmp_path, "c")
    run = write_run(tmp_path / "runs" / "a", corpus, 0, random_series(rng))
    empty = tmp_path / "empty" / "run"
    (empty / "tb").mkdir(parents=True)
    (empty / "tb" / "config.yaml").write_text("model: {model: tiny:qwen2}\n")
    out = tmp_path / "out" / "report"
    assert "no TensorBoard event files" in refused(
        capsys, "--runs", f"[{empty.parent}]", "--out", str(out))
    assert "no run dir in it" in refused(capsys, "--runs", f"[{corpus}]", "--out", str(out))
    assert "no such directory" in refused(capsys, "--runs", f"[{tmp_path / 'nope'}]",
                                          "--out", str(out))
    assert "no summary.json" in refused(capsys, "--runs", f"[{run}]", "--out", str(out),
                                        "--proxies", f"[{corpus}]")
    assert "lies inside --runs" in refused(capsys, "--runs", f"[{run}]",
                                           "--out", str(run / "report"))
    assert "matches none of the runs" in refused(capsys, "--runs", f"[{run}]", "--out",
                                                 str(out), "--conditions",
                                                 f"{{{tmp_path / 'elsewhere'}: x}}")
    write_run(tmp_path / "runs" / "b", corpus, 1, random_series(rng, tasks=("other/acc",)))
    assert "share no benchmark task" in refused(capsys, "--runs", f"[{tmp_path / 'runs'}]",
                                                "--out", str(out))
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "runs" / "a").glob("report*"))


def test_an_existing_report_is_replaced_only_with_overwrite(tmp_path, capsys):
    corpus = corpus_dir(tmp_path, "c")
    run = write_run(tmp_path / "runs" / "a", corpus, 0, random_series(np.random.default_rng(7)))
    out = tmp_path / "report"
    run_report("--runs", f"[{run}]", "--out", str(out))
    first = (out / "summary.md").read_text()
    assert "--overwrite" in refused(capsys, "--runs", f"[{run}]", "--out", str(out))
    run_report("--runs", f"[{run}]", "--out", str(out), "--overwrite", "true")
    assert (out / "summary.md").read_text().split("UTC")[1] == first.split("UTC")[1]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    assert "did not write" in refused(capsys, "--runs", f"[{run}]", "--out", str(other),
                                      "--overwrite", "true")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_report("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--runs", "--out", "--proxies", "--conditions", "--overwrite", "--note"):
        assert flag in text


@pytest.mark.slow
def test_real_debug_runs_two_conditions_two_subsets(tmp_path, capsys):
    """Fit configs/debug.yaml on its corpus and on a second one (T=1.0), 2 subsets each."""
    from selftrain.analysis.tb import read_scalars

    second = tmp_path / "corpus_t1"
    main(["generate", "--model", "tiny:qwen2", "--out", str(second), "--num_samples", "96",
          "--max_new_tokens", "32", "--temperature", "1.0", "--num_subsets", "2",
          "--batch_size", "64"])
    runs = tmp_path / "runs"
    for corpus, name in ((REPO / "configs/data/tiny_qwen2_self", "t0.7"), (second, "t1.0")):
        for subset in (0, 1):
            main(["fit", "--config", str(REPO / "configs/debug.yaml"),
                  "--trainer.default_root_dir", str(runs / f"{name}_s{subset}"),
                  "--data.corpus", str(corpus), "--data.subset", str(subset),
                  "--data.num_subsets", "2", "--trainer.max_epochs", "2",
                  "--trainer.enable_progress_bar", "false"])
    out = tmp_path / "report"
    run_report("--runs", f"[{runs}]", "--out", str(out))
    summary = (out / "summary.md").read_text()
    for name, condition in (("t0.7", "T=0.7"), ("t1.0", "T=1")):
        for tag in ("benchmark_delta/selftrain_facts/acc",
                    "likelihood/code/delta_logprob"):
            values = []
            for subset in (0, 1):
                scalars = read_scalars(runs / f"{name}_s{subset}" / "tb")
                epochs = dict(scalars["eval/epochs_completed"])
                values.append([v for step, v in scalars[tag] if epochs.get(step) == 2.0][0])
            first = "selftrain_facts: acc" if tag.startswith("bench") else "code"
            rows = [r for r in table_rows(summary, first) if r[1] == condition]
            row = rows[0] if first != "code" else rows[-1]  # benchmark table; likelihood table
            final, sd = row[3], row[4]
            assert float(final) == pytest.approx(np.mean(values), rel=1e-3, abs=1e-6)
            expected_sd = np.std(values, ddof=1)
            assert (sd == "—" and math.isnan(expected_sd)) or float(sd) == pytest.approx(
                expected_sd, rel=1e-3, abs=1e-6)
    drawn = json.loads((out / "figures.json").read_text())
    assert {d["file"] for d in drawn} == {"benchmark_delta.png", "extraction.png",
                                          "likelihood.png"}
    assert "which way is better" not in summary  # lm-eval's results files said, per task
    changes = {}
    for condition, name in (("T=0.7", "t0.7"), ("T=1", "t1.0")):  # SEs from the item files
        for metric in ("acc", "acc_norm"):
            differences = []
            for subset in (0, 1):
                eval_dir = runs / f"{name}_s{subset}" / "eval" / "benchmark"
                before, after = (pd.read_parquet(next(eval_dir.glob(f"epoch={e}-*.parquet")))
                                 for e in (0, 2))
                before, after = (t[t["metric"] == metric].sort_values("doc_id")["value"]
                                 .to_numpy() for t in (before, after))
                differences.append(after - before)
            change = changes[condition, metric] = np.mean(differences, axis=0)
            expected = np.std(change, ddof=1) / np.sqrt(len(change))
            row = [r for r in table_rows(summary, f"selftrain_facts: {metric}")
                   if r[1] == condition][0]
            assert float(row[3]) == pytest.approx(change.mean(), rel=1e-3, abs=1e-6)
            assert row[6] == f"paired, {len(change)} items" and len(change) == 8
            assert float(row[5]) == pytest.approx(expected, rel=1e-3, abs=1e-6)
    for metric in ("acc", "acc_norm"):  # the two conditions against each other, item by item
        gap = changes["T=0.7", metric] - changes["T=1", metric]
        (row,) = [r for r in table_rows(summary, f"selftrain_facts: {metric}")
                  if r[1:3] == ["T=0.7", "T=1"]]
        assert float(row[3]) == pytest.approx(gap.mean(), rel=1e-3, abs=1e-6)
        assert float(row[4]) == pytest.approx(np.std(gap, ddof=1) / np.sqrt(8), rel=1e-3,
                                              abs=1e-6)
        assert row[5] == "paired, 8 items"
    for name in ("t0.7_s0", "t0.7_s1", "t1.0_s0", "t1.0_s1"):  # what each run trained on
        scalars = read_scalars(runs / name / "tb")
        (row,) = [r for r in summary.splitlines() if r.startswith(f"| {runs / name} |")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3:] == [f"{int(scalars['data/train_rows'][0][1]):,}",
                             f"{int(scalars['data/train_tokens'][0][1]):,}", "0"]


def test_the_best_epoch_goes_the_way_lm_eval_says_the_metric_improves(tmp_path):
    """brier_score is lower-is-better in lm-eval: its best is its lowest mean, not its highest."""
    import pandas as pd

    from selftrain.analysis.curves import final_and_best
    from selftrain.analysis.runs import metric_directions

    results = tmp_path / "eval" / "BenchmarkEval" / "epoch=1-step=8.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({
        "results": {"t": {"alias": "t", "brier_score,none": 0.3, "acc,none": 0.5,
                          "acc_stderr,none": 0.1, "exact_match,strict-match": 0.2}},
        "higher_is_better": {"t": {"brier_score": False, "acc": True, "exact_match": True}}}))
    directions = metric_directions(tmp_path / "eval")
    assert directions == {"benchmark_delta/t/brier_score": False, "benchmark_delta/t/acc": True,
                          "benchmark_delta/t/exact_match_strict-match": True}
    means = [0.0, -0.095, -0.30, -0.192]  # replay's brier deltas, epochs 0..3
    curve = pd.DataFrame({"tag": "benchmark_delta/t/brier_score", "condition": "replay",
                          "epoch": range(4), "mean": means, "sd": 0.01, "n": 2})
    best = final_and_best(curve, {"replay": 2}, directions).iloc[0]
    assert (best.best_epoch, best.best_mean, best.final_mean) == (2, -0.30, -0.192)
    told_otherwise = final_and_best(curve, {"replay": 2},
                                    {"benchmark_delta/t/brier_score": True}).iloc[0]
    assert (told_otherwise.best_epoch, told_otherwise.best_mean) == (1, -0.095)
