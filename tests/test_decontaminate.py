"""selftrain.curation.decontaminate: exact n-gram removal, per-benchmark counts, errors.

Benchmarks come as local jsonl, lm-eval task YAMLs and task or group names
(selftrain.curation.benchmarks and .lm_eval_tasks, through ``--benchmarks``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonargparse
import pytest
from helpers import load_with_datasets, manifest_of, write_jsonl

from selftrain.corpus import CorpusWriter, read_corpus
from selftrain.curation.decontaminate import NgramHasher, decontaminate, normalize
from selftrain.errors import SelftrainError

FILLER = ("rivers carry silt toward quiet harbors while merchants count copper coins beside "
          "lanterns and gulls circle slowly over wooden piers at dusk").split()
QUESTION = "Which planet in our solar system is known as the red planet by most astronomers?"
CHOICE = "Mars is the fourth planet from the sun and has two small moons"
STORY = "the old lighthouse keeper climbed ninety nine stairs every single night before supper"


def filler(seed: int, words: int = 30) -> str:
    """Clean text: a rotation of FILLER (which shares no 8-gram with the benchmark texts)."""
    return " ".join(FILLER[(seed + i) % len(FILLER)] for i in range(words))


def write_corpus(path: Path, texts: list[str]) -> Path:
    rows = [{"id": 100 + i, "text": text, "input_ids": [1, i], "num_tokens": 2,
             "finished": i % 2 == 0, "subset": i % 2, "source": "test"}
            for i, text in enumerate(texts)]
    with CorpusWriter(path, shard_size=3) as writer:
        writer.add(rows)
        return writer.finish({"seed": 7, "counts": {"requested": len(rows), "tokens": 2 * len(
            rows), "finished": sum(row["finished"] for row in rows)}})


@pytest.fixture
def benchmark(tmp_path) -> Path:
    return write_jsonl(tmp_path / "quiz.jsonl", [
        {"question": QUESTION, "choices": [CHOICE, "Venus"], "label": 0},
        {"question": "Too short to count.", "answer": "yes"},
    ])


def test_removes_exactly_the_planted_samples(tmp_path, benchmark):
    texts = [filler(i) for i in range(10)]
    texts[2] = filler(2, 12) + " " + QUESTION.upper().replace(" ", "  ,") + " " + filler(5, 9)
    texts[7] = "so: " + CHOICE.replace("sun", "Sun!").replace("two", "(two)") + " -- indeed"
    corpus = write_corpus(tmp_path / "corpus", texts)

    out = decontaminate(str(corpus), str(tmp_path / "clean"), [str(benchmark)])

    kept = read_corpus(out).columns
    assert kept["id"] == [100 + i for i in range(10) if i not in (2, 7)]
    assert kept["text"] == [t for i, t in enumerate(texts) if i not in (2, 7)]
    assert kept["input_ids"] == [[1, i] for i in range(10) if i not in (2, 7)]
    record = manifest_of(out)["decontamination"]
    assert record["benchmarks"]["quiz"] == {"source": str(benchmark), "items": 2,
                                            "items_too_short": 1, "removed": 2,
                                            "ngrams": (15 - 8 + 1) + (13 - 8 + 1)}
    assert (record["removed"], record["kept"], record["ngram"]) == (2, 8, 8)
    counts = manifest_of(out)["counts"]
    assert counts == {"requested": 10, "tokens": 16, "finished": 4, "written": 8, "shards": 1}
    assert manifest_of(out)["seed"] == 7 and manifest_of(corpus)["counts"]["written"] == 10


def test_normalization_lowercases_and_splits_on_punctuation():
    assert normalize("Don't STOP—the U.S. café’s “best”, naïve\tπ≈3.14!") == [
        "dont", "stop", "the", "u", "s", "cafés", "best", "naïve", "π", "3", "14"]
    assert normalize("well-known and/or") == normalize("Well known and or")
    assert normalize("don’t") == normalize("DONT") == ["dont"]
    assert normalize("soft\u00adhyphen zero\u200dwidth") == ["softhyphen", "zerowidth"]  # Cf
    assert normalize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # combining marks are kept


def test_seven_shared_words_do_not_match_eight(tmp_path):
    item = "one two three four five six seven eight nine ten"
    bench = write_jsonl(tmp_path / "b.jsonl", [{"text": item}])
    texts = [filler(0), "x " + " ".join(item.split()[:7]) + " y", "One two three four five "
             "six seven eight", filler(1)]
    corpus = write_corpus(tmp_path / "corpus", texts)

    eight = read_corpus(decontaminate(str(corpus), str(tmp_path / "n8"), [str(bench)]))
    seven = read_corpus(decontaminate(str(corpus), str(tmp_path / "n7"), [str(bench)], ngram=7))
    assert eight.columns["text"] == [texts[0], texts[1], texts[3]]
    assert seven.columns["text"] == [texts[0], texts[3]]


def test_ngrams_never_span_two_fields_of_an_item(tmp_path):
    bench = write_jsonl(tmp_path / "b.jsonl", [{"q": "alpha beta gamma delta epsilon zeta",
                                                "a": ["eta theta iota kappa lambda mu"]}])
    texts = [filler(0), "delta epsilon zeta eta theta iota", "so alpha beta gamma delta epsilon "
             "zeta", "iota kappa lambda mu", "eta theta iota kappa lambda mu!"]
    out = decontaminate(str(write_corpus(tmp_path / "c", texts)), str(tmp_path / "o"),
                        [str(bench)], ngram=6)
    assert read_corpus(out).columns["text"] == texts[:2] + texts[3:4]  # [1] spans both fields
    assert manifest_of(out)["decontamination"]["benchmarks"]["b"]["ngrams"] == 2


def test_counts_per_benchmark_and_a_double_match_once_in_total(tmp_path, benchmark):
    other = write_jsonl(tmp_path / "stories.json", [[STORY], {"nested": {"deep": [STORY + "!"]}}])
    texts = [filler(0), QUESTION, STORY, QUESTION + " " + STORY, filler(3), CHOICE]
    corpus = write_corpus(tmp_path / "corpus", texts)

    out = decontaminate(str(corpus), str(tmp_path / "clean"), [str(benchmark), str(other)])

    record = manifest_of(out)["decontamination"]
    assert record["benchmarks"]["quiz"]["removed"] == 3  # QUESTION, QUESTION+STORY, CHOICE
    assert record["benchmarks"]["stories"]["removed"] == 2  # STORY, QUESTION+STORY
    assert record["benchmarks"]["stories"]["items"] == 2
    assert (record["removed"], record["kept"]) == (4, 2)
    assert read_corpus(out).columns["text"] == [texts[0], texts[4]]


def test_limit_caps_items_per_benchmark(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", [filler(0), QUESTION])
    bench = write_jsonl(tmp_path / "b.jsonl", [{"t": STORY}, {"t": QUESTION}])
    out = decontaminate(str(corpus), str(tmp_path / "o"), [str(bench)], limit=1)
    assert manifest_of(out)["decontamination"]["benchmarks"]["b"]["items"] == 1
    assert len(read_corpus(out)) == 2


def test_hashes_are_the_same_in_another_process():
    code = ("from selftrain.curation.decontaminate import NgramHasher; "
            "print(NgramHasher(3).hash(['A b c d', 'e f g'])[0].tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout
    hashes, owner = NgramHasher(3).hash(["A b c d", "e f g"])
    assert json.loads(other) == hashes.tolist() and owner.tolist() == [0, 0, 1]
    assert len(set(hashes.tolist())) == 3


def test_matches_a_plain_python_reference(qwen_corpus, tmp_path):
    n = 3  # the tiny random model writes byte soup: few whitespace-separated words per sample
    texts = read_corpus(qwen_corpus).columns["text"]
    words = [normalize(text) for text in texts]
    long = [i for i, w in enumerate(words) if len(w) >= n + 2]
    assert len(long) >= 4, "the tiny model's corpus should have a few longer texts"
    items = [{"text": " ".join(words[i][1:1 + n])} for i in long[:3]] + [{"text": filler(0)}]
    bench = write_jsonl(tmp_path / "b.jsonl", items)
    grams = {tuple(w[k:k + n]) for w in map(normalize, (r["text"] for r in items))
             for k in range(len(w) - n + 1)}
    expected = [i for i, w in enumerate(words)
                if not any(tuple(w[k:k + n]) in grams for k in range(len(w) - n + 1))]

    out = decontaminate(str(qwen_corpus), str(tmp_path / "clean"), [str(bench)], ngram=n)

    clean = read_corpus(out).columns
    original = read_corpus(qwen_corpus).columns
    assert clean["id"] == [original["id"][i] for i in expected] and len(expected) <= 45
    assert clean["input_ids"] == [original["input_ids"][i] for i in expected]
    assert manifest_of(out)["counts"]["tokens"] == sum(original["num_tokens"][i] for i in expected)
    assert manifest_of(out)["bos_token_id"] == manifest_of(qwen_corpus)["bos_token_id"]


def test_output_loads_with_datasets_parquet(tmp_path, benchmark):
    texts = [filler(i) for i in range(5)] + [QUESTION]
    out = decontaminate(str(write_corpus(tmp_path / "c", texts)), str(tmp_path / "o"),
                        [str(benchmark)])
    loaded = load_with_datasets(out, tmp_path / "hf")
    assert loaded["text"] == texts[:5] and loaded["subset"] == [0, 1, 0, 1, 0]


def test_plain_text_corpus_gets_row_numbers_as_ids(tmp_path, benchmark):
    corpus = tmp_path / "c.txt"
    corpus.write_text(f"{filler(0)}\n{QUESTION}\n{filler(1)}\n")
    out = decontaminate(str(corpus), str(tmp_path / "o"), [str(benchmark)])
    assert read_corpus(out).columns["id"] == [0, 2]
    assert manifest_of(out)["decontamination"]["input"] == str(corpus)


def task_yaml(path: Path, data: Path, task: str, hf_cache: Path, **extra: str) -> Path:
    lines = [f"task: {task}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {data}", f"  cache_dir: {hf_cache}", "test_split: test"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in extra.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def task_dir(tmp_path, benchmark) -> Path:
    """Two real lm-eval tasks on local json: multiple choice and generation."""
    tasks = tmp_path / "tasks"
    task_yaml(tasks / "quiz_mc.yaml", benchmark, "quiz_mc", tmp_path / "hf",
              output_type="multiple_choice", doc_to_text="Question: {{question}}\nAnswer:",
              doc_to_target="label", doc_to_choice="{{choices}}")
    stories = write_jsonl(tmp_path / "stories.jsonl", [{"prompt": "Tell me a story.",
                                                        "completion": STORY}])
    task_yaml(tasks / "stories_gen.yaml", stories, "stories_gen", tmp_path / "hf",
              output_type="generate_until", doc_to_text="{{prompt}}",
              doc_to_target="{{completion}}")
    (tasks / "group.yaml").write_text("group: quiz_and_stories\ntask: [quiz_mc, stories_gen]\n")
    return tasks


def test_lm_eval_task_yaml_and_task_name(tmp_path, task_dir):
    texts = [filler(0), "we read that " + CHOICE.lower(), filler(2), QUESTION, STORY]
    corpus = write_corpus(tmp_path / "corpus", texts)

    out = decontaminate(str(corpus), str(tmp_path / "clean"),
                        [str(task_dir / "quiz_mc.yaml"), "stories_gen"],
                        include_path=str(task_dir))

    record = manifest_of(out)["decontamination"]["benchmarks"]
    assert record["quiz_mc"]["removed"] == 2 and record["quiz_mc"]["items"] == 2
    assert record["quiz_mc"]["items_too_short"] == 1  # "Question: Too short to count. Answer:"
    assert record["stories_gen"] == {"source": "stories_gen", "items": 1, "items_too_short": 0,
                                     "ngrams": 13 - 8 + 1, "removed": 1}
    assert read_corpus(out).columns["text"] == [texts[0], texts[2]]


def test_lm_eval_group_counts_as_one_benchmark(tmp_path, task_dir):
    texts = [filler(0), QUESTION, STORY, filler(1)]
    corpus = write_corpus(tmp_path / "corpus", texts)
    out = decontaminate(str(corpus), str(tmp_path / "clean"), ["quiz_and_stories"],
                        include_path=str(task_dir))
    record = manifest_of(out)["decontamination"]["benchmarks"]["quiz_and_stories"]
    assert (record["items"], record["removed"]) == (3, 2)
    capped = decontaminate(str(corpus), str(tmp_path / "capped"), ["quiz_and_stories"],
                           include_path=str(task_dir), limit=2)
    assert manifest_of(capped)["decontamination"]["benchmarks"]["quiz_and_stories"]["items"] == 2


def test_task_yaml_reads_its_data_next_to_it_from_any_working_dir(tmp_path, monkeypatch):
    from selftrain.curation.benchmarks import load_benchmark

    tasks = Path(__file__).resolve().parents[1] / "configs" / "tasks"
    monkeypatch.chdir(tmp_path)  # the YAML names its jsonl relative to its own folder
    name, items = load_benchmark(str(tasks / "selftrain_large" / "selftrain_arith_large.yaml"))
    assert name == "selftrain_arith_large" and len(items) == 400
    assert items[0][0].startswith("Question: What is ")


def test_unreachable_task_data_is_one_line_error(tmp_path, task_dir):
    task_yaml(task_dir / "remote.yaml", "unused.json", "remote_task", tmp_path / "hf")
    text = (task_dir / "remote.yaml").read_text().replace("dataset_path: json",
                                                          "dataset_path: no-org/no-such-set")
    (task_dir / "remote.yaml").write_text(text)
    corpus = write_corpus(tmp_path / "corpus", [filler(0)])
    with pytest.raises(SelftrainError, match=r"^--benchmarks remote_task: the task's data could "
                       r"not be loaded .*no-org/no-such-set.*unreachable.*local \.jsonl") as error:
        decontaminate(str(corpus), str(tmp_path / "o"), ["remote_task"],
                      include_path=str(task_dir))
    assert "\n" not in str(error.value) and not (tmp_path / "o").exists()


def test_builtin_task_without_cached_data_is_unreachable_offline(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", [filler(0)])
    with pytest.raises(SelftrainError, match="--benchmarks hellaswag: the task's data could not "
                       "be loaded .*Rowan/hellaswag"):
        decontaminate(str(corpus), str(tmp_path / "o"), ["hellaswag"])
    assert not (tmp_path / "o").exists()


def bad_inputs(tmp: Path, corpus: Path, bench: Path) -> dict[str, tuple[dict, str]]:
    (tmp / "empty.jsonl").write_text("\n \n")
    (tmp / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp / "numbers.jsonl").write_text('{"n": 1}\n')
    (tmp / "nameless.yaml").write_text("dataset_path: json\noutput_type: generate_until\n")
    (tmp / "used").mkdir()
    (tmp / "used" / "keep.txt").write_text("x")
    return {
        "missing": ({"benchmarks": [str(tmp / "nope.jsonl")]}, r"--benchmarks \S+nope.jsonl: no"),
        "empty": ({"benchmarks": [str(tmp / "empty.jsonl")]}, r"empty.jsonl: the file is empty"),
        "broken": ({"benchmarks": [str(tmp / "broken.jsonl")]}, r"line 2 is not valid JSON"),
        "no_text": ({"benchmarks": [str(tmp / "numbers.jsonl")]}, r"no item has any text"),
        "nameless_yaml": ({"benchmarks": [str(tmp / "nameless.yaml")]}, r"no 'task' \(or "),
        "unknown_task": ({"benchmarks": ["no_such_task_xyz"], "include_path": str(tmp)},
                         r"--benchmarks no_such_task_xyz: not a file and not an lm-eval task"),
        "no_benchmarks": ({"benchmarks": []}, r"^--benchmarks: none given"),
        "ngram_0": ({"ngram": 0}, r"^--ngram 0: must be >= 1"),
        "limit_0": ({"limit": 0}, r"^--limit 0"),
        "same_name": ({"benchmarks": [str(bench), str(bench)]}, r"second benchmark named 'quiz'"),
        "missing_corpus": ({"corpus": str(tmp / "none")}, r"^--corpus \S+none: no such file"),
        "out_is_corpus": ({"out": str(corpus)}, r"^--out \S+: is --corpus itself"),
        "all_removed": ({"corpus": str(write_corpus(tmp / "dirty", [QUESTION, CHOICE]))},
                        r"every one of the 2 samples"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "broken", "no_text", "nameless_yaml",
                                  "unknown_task",
                                  "no_benchmarks", "ngram_0", "limit_0", "same_name",
                                  "missing_corpus", "out_is_corpus", "all_removed"])
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, benchmark, case):
    corpus = write_corpus(tmp_path / "corpus", [filler(0), QUESTION])
    overrides, pattern = bad_inputs(tmp_path, corpus, benchmark)[case]
    kwargs = {"corpus": str(corpus), "out": str(tmp_path / "new" / "out"),
              "benchmarks": [str(benchmark)], **overrides}
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SelftrainError, match=pattern) as error:
        decontaminate(**kwargs)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out dir, no staging dir
    assert len(read_corpus(corpus)) == 2


def test_existing_out_needs_overwrite_and_other_files_are_never_replaced(tmp_path, benchmark):
    corpus = write_corpus(tmp_path / "corpus", [filler(0), QUESTION])
    out = tmp_path / "out"
    decontaminate(str(corpus), str(out), [str(benchmark)], ngram=20)
    with pytest.raises(SelftrainError, match=r"^--out \S+out: already holds files"):
        decontaminate(str(corpus), str(out), [str(benchmark)])
    assert read_corpus(out).columns["text"] == [filler(0), QUESTION]
    decontaminate(str(corpus), str(out), [str(benchmark)], overwrite=True)
    assert read_corpus(out).columns["text"] == [filler(0)]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(SelftrainError, match=r"^--out \S+mine: holds files selftrain did "
                                                 r"not write there \(notes\.txt\)"):
            decontaminate(str(corpus), str(mine), [str(benchmark)], overwrite=overwrite)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_cli_flags_and_help(tmp_path, benchmark, capsys):
    corpus = write_corpus(tmp_path / "corpus", [filler(0), QUESTION])
    out = jsonargparse.CLI(decontaminate, as_positional=False, args=[
        "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--benchmarks",
        json.dumps([str(benchmark)]), "--ngram", "6", "--limit", "5"])
    assert manifest_of(out)["decontamination"]["ngram"] == 6 and len(read_corpus(out)) == 1
    single = jsonargparse.CLI(decontaminate, as_positional=False, args=[
        "--corpus", str(corpus), "--out", str(tmp_path / "single"), "--benchmarks",
        str(benchmark), "--ngram", "6", "--limit", "5"])
    assert read_corpus(single).columns["text"] == read_corpus(out).columns["text"]
    with pytest.raises(SystemExit):
        jsonargparse.CLI(decontaminate, as_positional=False, args=["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--corpus", "--out", "--benchmarks", "--ngram", "--include_path", "--limit",
                 "--overwrite", "words per n-gram"):
        assert flag in help_text
