"""selftrain.analysis.proxies: benchmark proximity, student NLL, the proximity split, errors.

The numbers are checked against independent computations: cosine similarities of the bundled
all-MiniLM-L6-v2's own ``encode`` output in numpy, and a one-row-at-a-time forward pass of
tiny:qwen2. The split must hold exactly the rows on each side and train as it is.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import DEBUG_CORPUS, fit, manifest_of, write_jsonl

from selftrain.analysis.proxies import QUANTILES, proxies, stats
from selftrain.analysis.student_nll import token_budget_batches
from selftrain.cli import main
from selftrain.corpus import CorpusWriter, read_corpus
from selftrain.embedding import BUNDLED_NAMES, resolve_embedding_model
from selftrain.models import load_model, load_tokenizer

QUIZ = [{"question": "Which planet in our solar system is known as the red planet?",
         "choices": ["Mars", "Venus"]},
        {"question": "At what temperature does water boil at sea level?", "answer": "100 C"}]
CODE = [{"prompt": "def add(a, b):\n    return a + b", "test": "assert add(1, 2) == 3"}]
TEXTS = ["Mars is called the red planet because of iron oxide on its surface.",
         "Water boils at one hundred degrees Celsius at sea level.",
         "The recipe needs two cups of flour and a pinch of salt.",
         "def multiply(x, y):\n    return x * y",
         "Stock markets fell sharply on Monday after the announcement.",
         "Venus is the hottest planet in the solar system.",
         "She walked her dog along the beach every morning.",
         "A python function that adds two numbers and returns the sum."]


@pytest.fixture
def benches(tmp_path) -> list[str]:
    return [str(write_jsonl(tmp_path / "quiz.jsonl", QUIZ)),
            str(write_jsonl(tmp_path / "code.jsonl", CODE))]


def write_corpus(path: Path, texts: list[str], manifest: dict | None = None) -> Path:
    """A corpus dir of ``texts`` (ids from the tiny byte tokenizer), in shards of 3 rows."""
    tokenizer = load_tokenizer("tiny:qwen2")
    rows = [{"id": 50 + i, "text": text, "subset": i % 2, "finished": i % 3 == 0,
             "input_ids": [256, *tokenizer(text, add_special_tokens=False)["input_ids"]],
             "source": "test"} for i, text in enumerate(texts)]
    for row in rows:
        row["num_tokens"] = len(row["input_ids"])
    with CorpusWriter(path, shard_size=3) as writer:
        writer.add(rows)
        return writer.finish(manifest or {"kind": "synthetic", "seed": 0, "num_subsets": 2,
                                          "counts": {"requested": len(rows)}})


def debug_corpus(path: Path, rows: int) -> Path:
    """The first ``rows`` rows of the debug corpus, with its manifest (ids reused by tiny:qwen2)."""
    source = read_corpus(DEBUG_CORPUS)
    manifest = {k: v for k, v in source.manifest.items()
                if k not in ("format", "tool_version", "created")}
    with CorpusWriter(path, shard_size=16) as writer:
        writer.add({name: values[i] for name, values in source.columns.items()}
                   for i in range(rows))
        return writer.finish(manifest)


def samples(out: Path) -> dict[str, list]:
    return pq.read_table(out / "samples.parquet").to_pydict()


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_max_similarity_equals_numpy_cosine_of_encode(tmp_path, benches):
    from sentence_transformers import SentenceTransformer

    corpus = write_corpus(tmp_path / "corpus", TEXTS)
    out = proxies(str(corpus), str(tmp_path / "out"), benches, embed_batch_size=3)

    model = SentenceTransformer(str(resolve_embedding_model("all-MiniLM-L6-v2")), device="cpu")

    def unit(texts: list[str]) -> np.ndarray:
        vectors = model.encode(texts, convert_to_numpy=True).astype(np.float64)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    corpus_vectors = unit(TEXTS)
    got = samples(out)
    assert got["id"] == [50 + i for i in range(len(TEXTS))]
    assert got["subset"] == [i % 2 for i in range(len(TEXTS))]
    expected = {}
    for name, items in (("quiz", QUIZ), ("code", CODE)):
        texts = ["\n".join(str(v) for value in item.values()
                           for v in (value if isinstance(value, list) else [value]))
                 for item in items]
        expected[name] = (corpus_vectors @ unit(texts).T).max(axis=1)
        np.testing.assert_allclose(got[f"max_similarity/{name}"], expected[name], atol=1e-5)
    np.testing.assert_allclose(got["max_similarity"], np.maximum(expected["quiz"],
                                                                 expected["code"]), atol=1e-5)
    assert np.argmax(got["max_similarity/quiz"]) in (0, 1) and "nll" not in got
    assert summary(out)["benchmarks"]["quiz"]["items"] == 2


def test_nll_equals_a_row_by_row_forward_pass(tmp_path, benches):
    corpus = debug_corpus(tmp_path / "corpus", 24)
    out = proxies(str(corpus), str(tmp_path / "out"), benches[:1], student="tiny:qwen2",
                  max_length=20, batch_tokens=50, precision="32")  # as the reference computes
    model = load_model("tiny:qwen2").eval()
    rows = read_corpus(corpus).columns["input_ids"]
    expected = []
    with torch.no_grad():
        for ids in rows:
            ids = torch.tensor([ids[:20]])
            logits = model(input_ids=ids).logits[0, :-1]
            expected.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())
    np.testing.assert_allclose(samples(out)["nll"], expected, rtol=1e-5)
    assert summary(out)["student"] == "tiny:qwen2"


def test_nll_of_text_without_the_students_ids_is_retokenized(tmp_path, benches):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": text} for text in TEXTS[:4]])
    out = proxies(str(plain), str(tmp_path / "out"), benches[:1], student="tiny:qwen2",
                  precision="32")
    tokenizer, model = load_tokenizer("tiny:qwen2"), load_model("tiny:qwen2").eval()
    expected = []
    with torch.no_grad():
        for text in TEXTS[:4]:
            ids = torch.tensor([[tokenizer.eos_token_id,
                                 *tokenizer(text, add_special_tokens=False)["input_ids"]]])
            logits = model(input_ids=ids).logits[0, :-1]
            expected.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())
    got = samples(out)
    np.testing.assert_allclose(got["nll"], expected, rtol=1e-5)
    assert got["id"] == [0, 1, 2, 3] and got["subset"] == [None] * 4
    assert summary(out)["corpus_kind"] is None and summary(out)["source_model"] is None


def test_split_holds_exactly_the_rows_of_each_side_and_trains(tmp_path, benches, run_dir):
    corpus = debug_corpus(tmp_path / "corpus", 40)
    first = proxies(str(corpus), str(tmp_path / "first"), benches)
    threshold = float(np.median(samples(first)["max_similarity"]))
    out = proxies(str(corpus), str(tmp_path / "out"), benches, threshold=threshold,
                  split_out=str(tmp_path / "split"))
    got = samples(out)
    above = [i for i, s in zip(got["id"], got["max_similarity"], strict=True) if s >= threshold]
    below = [i for i in got["id"] if i not in above]
    assert above and below
    original = read_corpus(corpus).columns
    for side, ids in (("above", above), ("below", below)):
        part = tmp_path / "split" / side
        rows = read_corpus(part).columns
        assert rows["id"] == ids
        keep = [original["id"].index(i) for i in ids]
        for column in ("text", "input_ids", "subset", "finished", "num_tokens"):
            assert rows[column] == [original[column][k] for k in keep]
        manifest = manifest_of(part)
        assert manifest["kind"] == "proximity-split"
        assert manifest["proximity"]["side"] == side
        assert manifest["proximity"]["threshold"] == threshold
        assert manifest["proximity"]["corpus"] == str(corpus.resolve())
        assert manifest["tokenizer"] == manifest_of(corpus)["tokenizer"]
        assert manifest["counts"]["written"] == len(ids)
        assert manifest["counts"]["tokens"] == sum(rows["num_tokens"])
    assert summary(out)["split"] == {
        "below": str((tmp_path / "split" / "below").resolve()),
        "above": str((tmp_path / "split" / "above").resolve()),
        "rows_below": len(below), "rows_above": len(above)}
    fit(run_dir, "--data.corpus", str(tmp_path / "split" / "above"), "--trainer.max_epochs", "1",
        "--data.batch_size", "4", callbacks=False)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_cells_split_each_proxy_at_its_median_within_the_source_and_train(tmp_path, benches,
                                                                          run_dir):
    corpus = debug_corpus(tmp_path / "corpus", 40)
    out = proxies(str(corpus), str(tmp_path / "out"), benches, student="tiny:qwen2",
                  cells_out=str(tmp_path / "cells"))
    got = samples(out)
    nll, similarity = np.array(got["nll"]), np.array(got["max_similarity"])
    cells = np.array(got["cell"])
    high_nll = cells >= 2
    assert high_nll.sum() == 20 and nll[high_nll].min() >= nll[~high_nll].max()
    for half in (False, True):
        members = high_nll == half
        high_sim = members & (cells % 2 == 1)
        assert high_sim.sum() == 10
        assert similarity[high_sim].min() >= similarity[members & ~high_sim].max()
    rows = read_corpus(tmp_path / "cells").columns
    original = read_corpus(corpus).columns
    assert rows["id"] == original["id"] == got["id"]
    assert rows["text"] == original["text"]
    assert rows["subset"] == cells.tolist()
    manifest = manifest_of(tmp_path / "cells")
    assert manifest["num_subsets"] == 4 and manifest["proxy_cells"]["source_num_subsets"] == 2
    record = summary(out)
    for cell in record["cells"]["cells"]:
        chosen = cells == cell["subset"]
        assert cell["rows"] == 10
        assert cell["nll_mean"] == pytest.approx(nll[chosen].mean())
        assert cell["max_similarity_mean"] == pytest.approx(similarity[chosen].mean())
    assert [s["subset"] for s in record["subsets"]] == sorted(set(original["subset"]))
    fit(run_dir, "--data.corpus", str(tmp_path / "cells"), "--data.subset", "3",
        "--data.num_subsets", "4", "--trainer.max_epochs", "1", "--data.batch_size", "4",
        callbacks=False)
    from selftrain.analysis.tb import read_scalars

    assert read_scalars(run_dir / "tb")["data/train_rows"][0][1] == 10  # cell 3 alone


def test_summary_matches_the_parquet(tmp_path, benches):
    corpus = debug_corpus(tmp_path / "corpus", 20)
    out = proxies(str(corpus), str(tmp_path / "out"), benches, student="tiny:qwen2",
                  threshold=0.1)
    got, report = samples(out), summary(out)
    assert set(report) == {"format", "corpus", "corpus_kind", "source_model", "temperature",
                           "rows", "embedding_model", "threshold", "benchmarks",
                           "max_similarity", "fraction_above", "student",
                           "student_precision", "nll", "kl", "kl_estimate", "split", "timing",
                           "subsets", "tool_version", "created"}
    assert [(s["subset"], s["rows"]) for s in report["subsets"]] == sorted(
        (k, got["subset"].count(k)) for k in set(got["subset"]))
    assert report["kl"]["mean"] == pytest.approx(np.nanmean(got["kl"]))  # logprobs recorded
    assert report["kl_estimate"]["temperature"] == 0.7
    from selftrain.precision import bf16_support

    # --precision auto, as resolved on this machine
    assert report["student_precision"] == ("bf16" if bf16_support("cpu").native else "32")
    assert (report["format"], report["corpus"], report["rows"]) == (
        "selftrain-proxies/1", str(corpus.resolve()), 20)
    assert (report["corpus_kind"], report["source_model"], report["temperature"]) == (
        "synthetic", "tiny:qwen2", 0.7)
    assert report["embedding_model"] == "all-MiniLM-L6-v2" and report["split"] is None
    for key, column in (("max_similarity", "max_similarity"), ("nll", "nll")):
        values = np.array(got[column])
        assert report[key]["mean"] == pytest.approx(values.mean())
        assert report[key]["std"] == pytest.approx(values.std())
        assert report[key]["quantiles"] == pytest.approx(
            dict(zip(map(str, QUANTILES), np.quantile(values, QUANTILES), strict=True)))
        assert len(report[key]["histogram"]["edges"]) == 21
        assert sum(report[key]["histogram"]["counts"]) == 20
    values = np.array(got["max_similarity"])
    assert report["fraction_above"] == pytest.approx(np.mean(values >= 0.1))
    for name in ("quiz", "code"):
        column = np.array(got[f"max_similarity/{name}"])
        assert report["benchmarks"][name]["max_similarity"] == stats(column)
        assert report["benchmarks"][name]["fraction_above"] == pytest.approx(
            np.mean(column >= 0.1))
    assert set(report["timing"]) == {"embed_seconds", "nll_seconds", "samples_per_second_embed",
                                     "samples_per_second_nll"}
    assert all(value > 0 for value in report["timing"].values())


def test_bundled_names_and_a_local_path_give_the_same_model(tmp_path, benches):
    bundled = resolve_embedding_model(BUNDLED_NAMES[0])
    assert resolve_embedding_model(BUNDLED_NAMES[1]) == bundled
    corpus = write_corpus(tmp_path / "corpus", TEXTS[:3])
    by_path = proxies(str(corpus), str(tmp_path / "a"), benches, embedding_model=str(bundled))
    by_name = proxies(str(corpus), str(tmp_path / "b"), benches,
                      embedding_model="sentence-transformers/all-MiniLM-L6-v2")
    assert samples(by_path)["max_similarity"] == samples(by_name)["max_similarity"]


def test_token_budget_batches_sort_by_length_and_keep_the_budget():
    lengths = [5, 1, 9, 3, 3, 20]
    batches = token_budget_batches(lengths, 10)
    assert [i for batch in batches for i in batch] == [1, 3, 4, 0, 2, 5]
    assert all(len(b) * max(lengths[i] for i in b) <= 10 or len(b) == 1 for b in batches)


def test_existing_out_needs_overwrite(tmp_path, benches):
    corpus = write_corpus(tmp_path / "corpus", TEXTS[:3])
    out = tmp_path / "out"
    proxies(str(corpus), str(out), benches)
    with pytest.raises(Exception, match=r"^--out \S+out: already holds files"):
        proxies(str(corpus), str(out), benches)
    proxies(str(corpus), str(out), benches[:1], overwrite=True)
    assert list(summary(out)["benchmarks"]) == ["quiz"]


def bad_cases(tmp: Path, corpus: Path, bench: str) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text("{}")
    return {
        "no_benchmarks": (["--benchmarks", "[]"], r"--benchmarks: none given"),
        "offline_model": (["--embedding_model", "no-such-org/no-such-model"],
                          r"--embedding_model no-such-org/no-such-model: not a local directory "
                          r"and not in the Hugging Face cache .*selftrain\[proxies\]"),
        "missing_model_dir": (["--embedding_model", str(tmp / "nope")],
                              r"--embedding_model \S+nope: not a local directory"),
        "missing_corpus": (["--corpus", str(tmp / "none")], r"--corpus \S+none: no such file"),
        "empty_corpus": (["--corpus", str(empty)], r"--corpus \S+empty: the corpus is empty"),
        "threshold_high": (["--threshold", "1.5"], r"--threshold 1.5: must be in \(-1, 1\]"),
        "threshold_low": (["--threshold", "-1"], r"--threshold -1(\.0)?: must be in \(-1, 1\]"),
        "out_is_corpus": (["--out", str(corpus)], r"--out \S+: is --corpus itself"),
        "out_in_corpus": (["--out", str(corpus / "proxies")], r"--out \S+: it lies inside "
                                                              r"--corpus"),
        "split_is_out": (["--split_out", str(tmp / "new" / "out" / "split")],
                         r"--split_out \S+: overlaps --out"),
        "split_in_corpus": (["--split_out", str(corpus / "split")],
                            r"--split_out \S+: it lies inside --corpus"),
        "one_side_empty": (["--threshold", "1.0", "--split_out", str(tmp / "split")],
                           r"--threshold 1.0: all 3 samples are below it"),
        "precision": (["--precision", "fp8"], r"--precision fp8: use one of auto, 32, bf16"),
        "student": (["--student", "tiny:nope"], r"--student 'tiny:nope': unknown tiny family"),
        "max_length": (["--max_length", "1"], r"--max_length 1: must be >= 2"),
        "device": (["--device", "cuda:7"] if not torch.cuda.is_available() else
                   ["--device", "tpu"], r"--device \S+: "),
    }


CASES = ["no_benchmarks", "offline_model", "missing_model_dir", "missing_corpus",
         "empty_corpus", "threshold_high", "threshold_low", "out_is_corpus", "out_in_corpus",
         "split_is_out", "split_in_corpus", "one_side_empty", "precision", "student",
         "max_length", "device", "no_sentence_transformers"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, benches, case, capsys,
                                                         monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", TEXTS[:3])
    if case == "no_sentence_transformers":
        monkeypatch.setitem(sys.modules, "sentence_transformers", None)
        flags, pattern = [], r"sentence-transformers is not installed; pip install " \
                             r"'selftrain\[proxies\]'"
    else:
        flags, pattern = bad_cases(tmp_path, corpus, benches[0])[case]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    args = ["proxies", "--corpus", str(corpus), "--out", str(tmp_path / "new" / "out"),
            "--benchmarks", benches[0], *flags]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("selftrain: error:")]
    assert len(errors) == 1, lines
    assert re.search(pattern, errors[0]), errors[0]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_kl_is_the_recorded_source_logprob_minus_the_students_per_token(tmp_path, benches,
                                                                         temperature):
    """The estimate equals an independent forward pass: log softmax(logits / T) over the
    tokenizer's vocabulary (all the sampler draws from) minus the student's log-probability
    (over the model's whole, padded vocabulary). Self-sampled at T=1 that is only the mass the
    student puts on padding ids, near 0; at T=0.5 it is clearly above."""
    from helpers import make_corpus

    corpus = make_corpus(tmp_path / "corpus", num_samples=24, max_new_tokens=20,
                         temperature=temperature)
    out = proxies(str(corpus), str(tmp_path / "out"), benches[:1], student="tiny:qwen2",
                  max_length=16, precision="32")  # rows are cut: the source side with them
    model, vocab = load_model("tiny:qwen2").eval(), len(load_tokenizer("tiny:qwen2"))
    rows = read_corpus(corpus).columns
    expected = []
    with torch.no_grad():
        for ids, recorded in zip(rows["input_ids"], rows["source_logprobs"], strict=True):
            ids = torch.tensor([ids[:16]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            targets = ids[0, 1:, None]
            source = torch.log_softmax(logits[:, :vocab] / temperature, -1).gather(
                -1, targets).squeeze(-1)
            student = torch.log_softmax(logits, -1).gather(-1, targets).squeeze(-1)
            np.testing.assert_allclose(recorded[:len(source)], source.numpy(), atol=1e-4)
            expected.append((source - student).mean().item())
    kl = np.array(samples(out)["kl"])
    np.testing.assert_allclose(kl, expected, atol=1e-4)
    if temperature == 1.0:
        assert (kl > -1e-4).all() and kl.max() < 0.05
    else:
        assert kl.mean() > 0.03  # beyond the padding mass alone (about 0.027 per token)
    record = summary(out)
    assert record["kl"]["mean"] == pytest.approx(kl.mean())
    assert record["kl_estimate"]["temperature"] == temperature


def test_kl_needs_recorded_logprobs_and_whole_rows_when_retokenized():
    from selftrain.analysis.student_nll import source_kl

    sums, counts = np.array([6.0, 6.0, 6.0, np.nan]), np.array([3.0, 3.0, 3.0, np.nan])
    recorded = [[-1.0, -1.0, -1.0, -1.0], None, [-2.0, -2.0], [-1.0]]
    same = source_kl(recorded, sums, counts, np.array([4, 4, 4, 1]), True, 4)
    np.testing.assert_allclose(same[:1], [(-3.0 + 6.0) / 3])  # first 3 targets only
    assert np.isnan(same[1:]).all()  # none recorded; fewer recorded than scored; < 2 tokens
    other = source_kl(recorded, sums, counts, np.array([4, 4, 9, 1]), False, 4)
    np.testing.assert_allclose(other[:1], [(-4.0 + 6.0) / 4])  # over the whole source row
    assert np.isnan(other[1:]).all()  # a row cut at max_length is not comparable
