"""selftrain.curation.replay: the token-matched real-text baseline for a synthetic corpus.

Lengths matched exactly (same tokenizer) or as the data module counts them (another), sources
as files, folders and streamed `datasets` names (selftrain.curation.documents), determinism,
training on it, and one-line errors.
"""

import itertools
import json
import random

import datasets
import jsonargparse
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import manifest_of, write_jsonl

from selftrain.corpus import SCHEMA, read_corpus
from selftrain.curation import replay as replay_module
from selftrain.curation.replay import replay
from selftrain.errors import SelftrainError
from selftrain.models import load_tokenizer, tokenizer_fingerprint
from selftrain.training.data import CorpusDataModule

WORDS = ("the a old new river stone garden city light bright quietly ran over under cat dog "
         "wind rain north south market bridge slowly sang built").split()


def make_paragraphs(count: int = 120, seed: int = 0) -> list[str]:
    """Varied English-like paragraphs, 1-6 sentences each, sentences on their own lines."""
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize()
                      + "." for _ in range(rng.randint(1, 6))) for _ in range(count)]


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    return make_paragraphs()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, paragraphs):
    path = tmp_path_factory.mktemp("replay_src") / "real.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def write_texts(path, texts, field="text"):
    """A jsonl file of ``texts``, each in ``field``, with its index as ``id``."""
    return write_jsonl(path, ({field: text, "id": i} for i, text in enumerate(texts)))


def rows_of(path):
    return read_corpus(path).columns


def test_same_tokenizer_matches_every_length_exactly(qwen_corpus, text_file, paragraphs,
                                                     tmp_path):
    out = replay(str(qwen_corpus), str(tmp_path / "rep"), [str(text_file)], "tiny:qwen2")
    synthetic, rows, manifest = rows_of(qwen_corpus), rows_of(out), manifest_of(out)
    tokenizer = load_tokenizer("tiny:qwen2")
    bos, eos = manifest["bos_token_id"], tokenizer.eos_token_id
    target = sum(synthetic["num_tokens"])
    assert manifest["matched"]["ids_reused"] is True
    assert manifest["matched"]["tokens"] == manifest["counts"]["tokens"] == target
    assert sum(rows["num_tokens"]) == target  # exact, so within 1% a fortiori
    assert sorted(rows["num_tokens"]) == sorted(synthetic["num_tokens"])
    assert sorted(rows["id"]) == list(range(48)) and manifest["counts"]["written"] == 48
    assert manifest["num_subsets"] == 2
    for subset in (0, 1):  # subset k of the replay matches subset k of the synthetic, row for row
        copied = [n for n, k in zip(synthetic["num_tokens"], synthetic["subset"], strict=True)
                  if k == subset]
        replayed = [n for n, k in zip(rows["num_tokens"], rows["subset"], strict=True)
                    if k == subset]
        assert sorted(replayed) == sorted(copied)
        assert manifest["subset_tokens"]["replay"][subset] == sum(copied) == (
            manifest["subset_tokens"]["synthetic"][subset])
    assert manifest["kind"] == "replay" and manifest["tokenizer"]["fingerprint"] == (
        tokenizer_fingerprint(tokenizer))
    assert manifest["length_stats"]["replay"] == manifest["length_stats"]["synthetic"]
    for ids, n, text, finished, source in zip(rows["input_ids"], rows["num_tokens"],
                                              rows["text"], rows["finished"], rows["source"],
                                              strict=True):
        assert ids[0] == bos and len(ids) == n
        assert (ids[-1] == eos) == finished
        assert tokenizer.decode(ids[1:-1] if finished else ids[1:]) == text
        # each row is the start of one paragraph; finished rows are whole paragraphs
        assert any(p == text if finished else p.startswith(text) for p in paragraphs)
        assert source == str(text_file)


def test_other_tokenizer_counts_like_the_data_module(qwen_corpus, text_file, tmp_path):
    out = replay(str(qwen_corpus), str(tmp_path / "rep"), str(text_file), "tiny:llama")
    manifest, rows = manifest_of(out), rows_of(out)
    fed = CorpusDataModule(str(qwen_corpus), tokenizer="tiny:llama", max_length=100_000,
                           min_real_token_fraction=0.0)
    fed.load()
    assert fed.stats["retokenized"] and manifest["matched"]["ids_reused"] is False
    assert manifest["matched"]["tokens"] == fed.stats["tokens"] == sum(rows["num_tokens"])
    assert sorted(rows["num_tokens"]) == sorted(len(r["input_ids"]) for r in fed.rows)
    assert manifest["matched"]["tokens"] != sum(rows_of(qwen_corpus)["num_tokens"])
    assert manifest["bos_token_id"] == load_tokenizer("tiny:llama").bos_token_id == 256


def test_replay_trains_with_its_ids_reused_and_one_bos(qwen_corpus, text_file, tmp_path):
    out = replay(str(qwen_corpus), str(tmp_path / "rep"), str(text_file), "tiny:llama")
    bos = manifest_of(out)["bos_token_id"]
    module = CorpusDataModule(str(out), tokenizer="tiny:llama", max_length=100_000,
                              min_real_token_fraction=0.0)
    module.load()
    assert module.stats["retokenized"] is False
    assert [r["input_ids"] for r in module.rows] == rows_of(out)["input_ids"]
    assert all(r["input_ids"][0] == bos and bos not in r["input_ids"][1:] for r in module.rows)
    assert module.stats["tokens"] == manifest_of(out)["matched"]["tokens"]


def test_same_seed_same_corpus_other_seed_other_text(qwen_corpus, text_file, tmp_path):
    runs = [rows_of(replay(str(qwen_corpus), str(tmp_path / name), str(text_file),
                           "tiny:qwen2", seed=seed))
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert runs[0]["input_ids"] == runs[1]["input_ids"] and runs[0]["text"] == runs[1]["text"]
    assert sorted(runs[0]["text"]) != sorted(runs[2]["text"])  # other documents, not only order
    assert sorted(runs[0]["num_tokens"]) == sorted(runs[2]["num_tokens"])


def test_txt_jsonl_json_parquet_and_dirs_give_the_same_corpus(qwen_corpus, paragraphs,
                                                              tmp_path):
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "real.txt").write_text("\n\n".join(paragraphs))
    write_texts(src / "real.jsonl", paragraphs, field="body")
    (src / "real.json").write_text(json.dumps([{"body": p} for p in paragraphs]))
    pq.write_table(pa.table({"body": paragraphs}), src / "real.parquet")
    half = len(paragraphs) // 2  # a dir: files read in sorted order, then pooled and shuffled
    write_texts(src / "dir" / "a.jsonl", paragraphs[:half], field="body")
    pq.write_table(pa.table({"body": paragraphs[half:]}), src / "dir" / "b.parquet")
    (src / "dir" / ".hidden.txt").write_text("not a document of the corpus")
    results = {name: rows_of(replay(str(qwen_corpus), str(tmp_path / name.replace(".", "_")),
                                    str(src / name), "tiny:qwen2", text_field="body"))
               for name in ("real.txt", "real.jsonl", "real.json", "real.parquet", "dir")}
    reference = results["real.txt"]["input_ids"]
    assert all(rows["input_ids"] == reference for rows in results.values())
    assert {s.rsplit("/", 1)[-1] for s in results["dir"]["source"]} == {"a.jsonl", "b.parquet"}


def test_datasets_name_is_streamed_shuffled_and_stopped(qwen_corpus, paragraphs, tmp_path,
                                                       monkeypatch):
    def endless():  # a stream that never ends, like a hub dataset read as a stream
        for i in itertools.count():
            yield {"text": paragraphs[i % len(paragraphs)], "meta": i}

    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return datasets.IterableDataset.from_generator(endless)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(replay_module, "SHUFFLE_BUFFER", 500)  # keeps the test fast
    runs = [replay(str(qwen_corpus), str(tmp_path / name), "PleIAs/common_corpus", "tiny:qwen2",
                   split="train", seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 5))]
    assert calls == [("PleIAs/common_corpus", "train", True)] * 3
    manifest, rows = manifest_of(runs[0]), rows_of(runs[0])
    assert set(rows["source"]) == {"PleIAs/common_corpus"}
    assert manifest["counts"]["tokens"] == manifest["matched"]["tokens"]
    assert manifest["source"]["shuffle_buffer"] == 500
    assert rows["input_ids"] == rows_of(runs[1])["input_ids"]
    assert rows["text"] != rows_of(runs[2])["text"]
    with pytest.raises(SelftrainError, match="--text_field body: dataset PleIAs/common_corpus "
                                             "has no such column; it has text, meta"):
        replay(str(qwen_corpus), str(tmp_path / "d"), "PleIAs/common_corpus", "tiny:qwen2",
               text_field="body")


def test_schema_and_datasets_parquet_loading(qwen_corpus, text_file, tmp_path):
    out = replay(str(qwen_corpus), str(tmp_path / "rep"), str(text_file), "tiny:qwen2",
                 shard_size=20)
    shards = sorted((out / "data").glob("*.parquet"))
    assert len(shards) == 3 and all(pq.read_schema(s).equals(SCHEMA) for s in shards)
    loaded = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"),
                                   split="train")
    assert len(loaded) == 48 and set(SCHEMA.names) <= set(loaded.column_names)
    assert sum(loaded["num_tokens"]) == manifest_of(out)["matched"]["tokens"]


def test_best_fit_fills_short_rows_with_whole_short_documents(tmp_path):
    # windows 9, 19, 29 (text lengths; no BOS, no EOS in a plain file); documents one byte
    # shorter (the EOS closes them), in the wrong order for a first-come fill
    match = write_texts(tmp_path / "match.jsonl", ["x" * 9, "y" * 19, "z" * 29])
    docs = ["c" * 28, "a" * 8, "b" * 18]
    out = replay(str(match), str(tmp_path / "rep"),
                 str(write_texts(tmp_path / "docs.jsonl", docs)), "tiny:qwen2")
    rows, manifest = rows_of(out), manifest_of(out)
    assert all(rows["finished"]) and sorted(rows["text"]) == sorted(docs)
    assert manifest["source"]["documents"] == {"read": 3, "used": 3, "too_short": 0}
    assert sum(rows["num_tokens"]) == 10 + 20 + 30 and manifest["num_subsets"] == 1


def test_book_length_document_gives_a_cut_prefix(tmp_path):
    match = write_texts(tmp_path / "match.jsonl", ["x" * 40])
    book = " ".join(make_paragraphs(400, seed=3))  # far past the tokenization budget
    assert len(book) > 16 * (40 + 16)
    out = replay(str(match), str(tmp_path / "rep"),
                 str(write_texts(tmp_path / "book.jsonl", [book])), "tiny:qwen2")
    rows = rows_of(out)
    assert rows["text"] == [book[:40]] and rows["finished"] == [False]


def test_tolerance_allows_a_small_shortfall_and_no_more(tmp_path):
    match = write_texts(tmp_path / "match.jsonl", ["x" * 99] * 200)  # 200 rows of 100 tokens
    docs = ["w" * 98] * 100 + ["v" * 150] * 99  # 199 documents: 99.5% of the tokens
    source = str(write_texts(tmp_path / "docs.jsonl", docs))
    out = replay(str(match), str(tmp_path / "rep"), source, "tiny:qwen2")
    rows, manifest = rows_of(out), manifest_of(out)
    assert manifest["counts"]["tokens"] == 19_900 and manifest["matched"]["tokens"] == 20_000
    assert sorted(rows["id"]) == list(range(199)) and sum(rows["finished"]) == 100
    with pytest.raises(SelftrainError, match="--sources .*only 19,900 of 20,000 tokens"):
        replay(str(match), str(tmp_path / "strict"), source, "tiny:qwen2", tolerance=0.0)
    assert not (tmp_path / "strict").exists()


def test_too_little_text_fails_on_one_line_and_writes_nothing(qwen_corpus, tmp_path):
    source = write_texts(tmp_path / "small.jsonl", make_paragraphs(5))
    out = tmp_path / "runs" / "rep"
    with pytest.raises(SelftrainError) as error:
        jsonargparse.CLI(replay, as_positional=False, args=[
            "--match", str(qwen_corpus), "--out", str(out), "--sources", str(source),
            "--student", "tiny:qwen2"])
    message = str(error.value)
    assert message.startswith(f"--sources {source}: only ") and "\n" not in message
    assert not out.parent.exists()  # no staging dir left, nor the parent made for it


def test_unknown_dataset_offline_fails_on_one_line(qwen_corpus, tmp_path):
    with pytest.raises(SelftrainError) as error:
        replay(str(qwen_corpus), str(tmp_path / "rep"), ["nobody/no_such_dataset"],
               "tiny:qwen2")
    message = str(error.value)
    assert message.startswith("--sources nobody/no_such_dataset: cannot stream")
    assert "local" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_existing_out_is_refused_without_overwrite(qwen_corpus, text_file, tmp_path):
    out = tmp_path / "rep"
    replay(str(qwen_corpus), str(out), str(text_file), "tiny:qwen2", seed=1)
    first = rows_of(out)
    with pytest.raises(SelftrainError, match="--out .* already holds files"):
        replay(str(qwen_corpus), str(out), str(text_file), "tiny:qwen2")
    assert rows_of(out) == first
    replay(str(qwen_corpus), str(out), str(text_file), "tiny:qwen2", overwrite=True)
    assert rows_of(out) != first and manifest_of(out)["counts"]["written"] == 48
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    with pytest.raises(SelftrainError, match="--out .* holds files selftrain did not write"):
        replay(str(qwen_corpus), str(mine), str(text_file), "tiny:qwen2", overwrite=True)
    assert (mine / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("change, fragment", [
    ({"sources": ["/nonexistent/real.txt"]}, "--sources /nonexistent/real.txt: no such file"),
    ({"sources": []}, "--sources is empty"),
    ({"student": "tiny:nope"}, "--student"),
    ({"text_field": "body"}, "--text_field body: no record"),
    ({"tolerance": 1.0}, "--tolerance"),
    ({"num_subsets": 0}, "--num_subsets"),
    ({"match": "/nonexistent/corpus"}, "--match /nonexistent/corpus"),
    ({"seed": -1}, "--seed -1"),
    ({"bos_token_id": -4}, "--bos_token_id -4: a token id must be in 0..256"),
    ({"bos_token_id": 257}, "--bos_token_id 257"),
])
def test_bad_flags_name_the_flag(qwen_corpus, tmp_path, change, fragment):
    source = write_texts(tmp_path / "docs.jsonl", make_paragraphs(200))
    kwargs = {"match": str(qwen_corpus), "out": str(tmp_path / "new" / "rep"),
              "sources": [str(source)], "student": "tiny:qwen2", **change}
    with pytest.raises(SelftrainError, match=fragment):
        replay(**kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no out, no parent


def test_out_cannot_be_the_matched_corpus(qwen_corpus, text_file):
    with pytest.raises(SelftrainError, match="--out .* is the --match corpus"):
        replay(str(qwen_corpus), str(qwen_corpus), str(text_file), "tiny:qwen2", overwrite=True)
    assert manifest_of(qwen_corpus)["kind"] == "synthetic"  # the synthetic corpus is untouched


def test_cli_flags_and_help(qwen_corpus, text_file, tmp_path, capsys):
    out = jsonargparse.CLI(replay, as_positional=False, args=[
        "--match", str(qwen_corpus), "--out", str(tmp_path / "rep"),
        "--sources", f"[{text_file}]", "--student", "tiny:qwen2", "--num_subsets", "3",
        "--seed", "7"])
    rows, manifest = rows_of(out), manifest_of(out)
    assert manifest["num_subsets"] == 3 and manifest["seed"] == 7
    synthetic = rows_of(qwen_corpus)  # K = 3 is not the corpus's: its row i is in i mod 3
    assert [sorted(n for n, k in zip(rows["num_tokens"], rows["subset"], strict=True) if k == s)
            for s in range(3)] == [sorted(synthetic["num_tokens"][s::3]) for s in range(3)]
    with pytest.raises(SystemExit) as done:
        jsonargparse.CLI(replay, as_positional=False, args=["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--sources" in text and "blank-line-separated paragraph" in text
    assert "--tolerance" in text and "PleIAs/common_corpus" in text
