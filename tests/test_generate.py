"""selftrain.sampling.generate: the corpus dir it writes, determinism, resume, refusals.

Slow: SIGKILLed twice and rerun, and under torchrun with 2 processes; both end with the
uninterrupted one-process corpus, id for id.
"""

import subprocess
import sys

import pytest
from helpers import (
    REPO,
    kill_when,
    load_with_datasets,
    make_corpus,
    manifest_of,
    selftrain,
    succeeded,
)

from selftrain.corpus import read_corpus
from selftrain.errors import SelftrainError
from selftrain.models import load_tokenizer, tokenizer_fingerprint


def test_corpus_dir_schema_and_bos(qwen_corpus):
    manifest = manifest_of(qwen_corpus)
    corpus = read_corpus(qwen_corpus)
    bos = manifest["bos_token_id"]
    assert manifest["bos_source"] == "tokenizer.eos_token_id"  # Qwen2-style: no BOS token
    assert len(corpus) == manifest["counts"]["written"] == manifest["counts"]["requested"] == 48
    assert all(ids[0] == bos for ids in corpus.columns["input_ids"])
    assert all(ids[1] != bos or fin for ids, fin in  # no second BOS added by a tokenizer
               zip(corpus.columns["input_ids"], corpus.columns["finished"], strict=True))
    assert corpus.columns["num_tokens"] == [len(ids) for ids in corpus.columns["input_ids"]]
    assert sorted(corpus.columns["id"]) == list(range(48))
    assert set(corpus.columns["subset"]) == {0, 1}
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(
        load_tokenizer("tiny:qwen2"))
    assert manifest["sampling"]["temperature"] == 1.0 and manifest["seed"] == 0


def test_finished_rows_end_on_eos_and_text_matches_ids(qwen_corpus):
    corpus = read_corpus(qwen_corpus)
    tokenizer = load_tokenizer("tiny:qwen2")
    eos = tokenizer.eos_token_id
    for ids, finished, text in zip(corpus.columns["input_ids"], corpus.columns["finished"],
                                   corpus.columns["text"], strict=True):
        assert (ids[-1] == eos) == finished
        body = ids[1:-1] if finished else ids[1:]
        assert tokenizer.decode(body, skip_special_tokens=True) == text


def test_padded_vocab_ids_are_never_sampled(tmp_path):
    out = make_corpus(tmp_path / "c", num_samples=32, max_new_tokens=32)
    vocab = len(load_tokenizer("tiny:qwen2"))  # the model's embedding has 7 padded rows more
    assert max(max(ids) for ids in read_corpus(out).columns["input_ids"]) < vocab


def test_loads_with_datasets_parquet(qwen_corpus, tmp_path):
    loaded = load_with_datasets(qwen_corpus, tmp_path / "hf")
    assert len(loaded) == 48
    assert {"id", "text", "input_ids", "num_tokens", "finished", "subset"} <= set(
        loaded.column_names)


def test_same_seed_same_corpus(tmp_path):
    a = read_corpus(make_corpus(tmp_path / "a", num_samples=16, seed=3))
    b = read_corpus(make_corpus(tmp_path / "b", num_samples=16, seed=3))
    c = read_corpus(make_corpus(tmp_path / "c", num_samples=16, seed=4))
    assert a.columns["input_ids"] == b.columns["input_ids"]
    assert a.columns["input_ids"] != c.columns["input_ids"]


def test_sample_i_does_not_depend_on_batch_size_or_sharding(tmp_path):
    a = read_corpus(make_corpus(tmp_path / "a", num_samples=40, batch_size=16, shard_size=40))
    b = read_corpus(make_corpus(tmp_path / "b", num_samples=40, batch_size=3, shard_size=7))
    assert a.columns["input_ids"] == b.columns["input_ids"]
    assert len(list((tmp_path / "b" / "data").glob("*.parquet"))) == 6


def test_a_corpus_with_other_settings_is_refused_and_left_alone(qwen_corpus):
    before = {p.name: p.stat().st_mtime_ns for p in qwen_corpus.rglob("*")}
    with pytest.raises(SelftrainError, match="--overwrite.*|num_subsets"):
        make_corpus(qwen_corpus)  # num_subsets 1, not 2
    assert {p.name: p.stat().st_mtime_ns for p in qwen_corpus.rglob("*")} == before


def test_rerun_with_same_settings_is_a_no_op_and_overwrite_replaces(tmp_path):
    out = make_corpus(tmp_path / "c", num_samples=16, seed=1)
    manifest = (out / "manifest.json").read_text()
    make_corpus(out, num_samples=16, seed=1)
    assert (out / "manifest.json").read_text() == manifest
    make_corpus(out, num_samples=8, seed=2, overwrite=True)
    assert manifest_of(out)["counts"]["written"] == 8
    assert len(read_corpus(out)) == 8


def test_killed_run_resumes_to_exactly_n_unique_ids(tmp_path, monkeypatch):
    from selftrain.sampling.shards import ShardedCorpus

    reference = read_corpus(make_corpus(tmp_path / "ref", num_samples=40, shard_size=8))
    real_write = ShardedCorpus.write_shard
    written = []

    def write_then_die(self, index, rows):
        if len(written) == 2:
            raise KeyboardInterrupt  # the process dies between two shard writes
        real_write(self, index, rows)
        written.append(index)

    monkeypatch.setattr(ShardedCorpus, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_corpus(tmp_path / "c", num_samples=40, shard_size=8)
    monkeypatch.setattr(ShardedCorpus, "write_shard", real_write)
    with pytest.raises(SelftrainError, match="unfinished"):
        read_corpus(tmp_path / "c")
    with pytest.raises(SelftrainError, match="other settings"):
        make_corpus(tmp_path / "c", num_samples=40, shard_size=8, seed=9)

    out = make_corpus(tmp_path / "c", num_samples=40, shard_size=8)
    resumed = read_corpus(out)
    assert resumed.columns["id"] == list(range(40))
    assert resumed.columns["input_ids"] == reference.columns["input_ids"]
    assert manifest_of(out)["timing"]["samples_this_run"] == 24
    assert sorted(p.name for p in out.rglob(".*")) == []  # no plan, no temp files left


def test_ctrl_c_names_the_shards_kept_over_every_temperature(tmp_path, monkeypatch):
    from selftrain.errors import Interrupted
    from selftrain.sampling.generate import generate
    from selftrain.sampling.shards import ShardedCorpus

    real_write = ShardedCorpus.write_shard
    written = []

    def write_until_ctrl_c(self, index, rows):
        if len(written) == 5:
            raise KeyboardInterrupt  # Ctrl-C while the sixth shard is being sampled
        real_write(self, index, rows)
        written.append(index)

    sweep = {"model": "tiny:qwen2", "out": str(tmp_path / "sweep"), "num_samples": 8,
             "max_new_tokens": 8, "temperature": [0.5, 1.5], "batch_size": 4, "shard_size": 2}
    monkeypatch.setattr(ShardedCorpus, "write_shard", write_until_ctrl_c)
    with pytest.raises(Interrupted) as interrupted:  # 4 shards of t0.5, then 1 of t1.5
        generate(**sweep)
    assert str(interrupted.value) == ("interrupted after 5 of 8 shards; rerun the same command "
                                      "to resume")
    monkeypatch.setattr(ShardedCorpus, "write_shard", real_write)
    assert manifest_of(tmp_path / "sweep" / "t0.5")["counts"]["written"] == 8
    cold, hot = generate(**sweep)
    assert manifest_of(cold)["timing"]["samples_this_run"] == 8  # from its first run
    assert manifest_of(hot)["timing"]["samples_this_run"] == 6  # 3 shards resumed
    assert read_corpus(hot).columns["id"] == list(range(8))


def test_temperature_list_writes_one_corpus_per_value(tmp_path):
    from selftrain.sampling.generate import generate

    outs = generate(model="tiny:qwen2", out=str(tmp_path / "sweep"), num_samples=12,
                    max_new_tokens=16, temperature=[0.5, 1.5], batch_size=4)
    assert [p.name for p in outs] == ["t0.5", "t1.5"]
    cold, hot = (read_corpus(p) for p in outs)
    assert [manifest_of(p)["sampling"]["temperature"]
            for p in outs] == [0.5, 1.5]
    assert cold.columns["input_ids"] != hot.columns["input_ids"]
    alone = read_corpus(make_corpus(tmp_path / "alone", num_samples=12, max_new_tokens=16,
                                    temperature=1.5))
    assert alone.columns["input_ids"] == hot.columns["input_ids"]


def test_progress_bar_shows_samples_rate_and_eta(tmp_path, capsys):
    make_corpus(tmp_path / "c", num_samples=16)
    err = capsys.readouterr().err
    assert "16/16" in err and "sample/s" in err and "tok_s=" in err and "<00:00" in err


@pytest.mark.parametrize("kwargs, flag", [
    ({"temperature": 0.0}, "--temperature"),
    ({"num_samples": 0}, "--num_samples"),
    ({"max_new_tokens": 0}, "--max_new_tokens"),
    ({"model": "tiny:nope"}, "--model"),
    ({"temperature": [1.0, -0.5]}, "--temperature"),
    ({"top_p": 0.0}, "--top_p"),
    ({"top_k": -1}, "--top_k"),
    ({"shard_size": 0}, "--shard_size"),
    ({"bos_token_id": 10_000}, "--bos_token_id"),
    ({"bos_token_id": -1}, "--bos_token_id"),
    ({"seed": -1}, "--seed"),
    ({"seed": 2**64}, "--seed"),
    ({"dtype": "float8"}, "--dtype"),
    ({"device": "cuda:99"}, "--device"),
    ({"device": "tpu"}, "--device"),
])
def test_bad_flags_fail_before_writing(tmp_path, kwargs, flag):
    params = {"num_samples": 4, "max_new_tokens": 4, **kwargs}
    with pytest.raises(SelftrainError, match=flag):
        make_corpus(tmp_path / "out", **params)
    assert not any(tmp_path.iterdir())


def test_out_that_is_a_file_is_one_clear_error(tmp_path):
    target = tmp_path / "corpus"
    target.write_text("not a dir")
    with pytest.raises(SelftrainError, match="--out .* is a file"):
        make_corpus(target, num_samples=4)
    with pytest.raises(SelftrainError, match="--out .* is a file"):  # the parent of t*/ dirs
        make_corpus(target, num_samples=4, temperature=[0.5, 1.0])
    assert target.read_text() == "not a dir"


def test_leftovers_of_a_run_killed_before_its_plan_are_not_foreign(tmp_path):
    out = tmp_path / "c"
    (out / "data").mkdir(parents=True)
    (out / ".in_progress.json.tmp-123").write_text("{")
    assert len(read_corpus(make_corpus(out, num_samples=8))) == 8
    assert not (out / ".in_progress.json.tmp-123").exists()


def test_unreadable_manifest_is_refused_then_replaced_with_overwrite(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "manifest.json").write_text("{ not json")
    with pytest.raises(SelftrainError, match="not a selftrain corpus"):
        make_corpus(out, num_samples=4)
    assert len(read_corpus(make_corpus(out, num_samples=4, overwrite=True))) == 4


# --- real processes -------------------------------------------------------------------------

GENERATE = ["--model", "tiny:qwen2", "--num_samples", "600", "--max_new_tokens", "48",
            "--shard_size", "25", "--seed", "11"]


def assert_is_the_one_process_corpus(out, reference):
    """The corpus in ``out`` is ids 0..599 of GENERATE, as one process writes them."""
    from selftrain.sampling.generate import generate

    (path,) = generate(model="tiny:qwen2", out=str(reference), num_samples=600,
                       max_new_tokens=48, shard_size=600, seed=11, batch_size=7)
    corpus = read_corpus(out).columns
    assert corpus["id"] == list(range(600))
    assert corpus["input_ids"] == read_corpus(path).columns["input_ids"]


@pytest.mark.slow
def test_generate_killed_twice_with_sigkill_resumes_to_the_same_corpus(tmp_path):
    out = tmp_path / "corpus"
    args = ["generate", *GENERATE, "--out", str(out), "--batch_size", "16"]
    for shards_before_kill in (2, 10):
        kill_when([sys.executable, "-m", "selftrain", *args],
                  lambda n=shards_before_kill: len(list((out / "data").glob("*.parquet"))) >= n,
                  poll=0.005)
        assert not (out / "manifest.json").exists(), "the run must be killed before the end"

    result = succeeded(selftrain(*args, timeout=600))
    assert "resuming" in result.stderr
    assert_is_the_one_process_corpus(out, tmp_path / "reference")
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    manifest = manifest_of(out)
    assert manifest["counts"]["written"] == 600 and manifest["sharding"]["num_shards"] == 24
    assert manifest["timing"]["samples_this_run"] < 600


@pytest.mark.slow
def test_generate_under_torchrun_splits_shards_and_matches_one_process(tmp_path):
    out = tmp_path / "corpus"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--module", "selftrain", "generate", *GENERATE, "--out", str(out), "--batch_size", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    succeeded(result)
    assert_is_the_one_process_corpus(out, tmp_path / "reference")
    manifest = manifest_of(out)
    assert manifest["timing"]["processes"] == 2
    assert manifest["timing"]["samples_this_run"] == 600


def test_overwrite_keeps_the_old_corpus_until_the_new_one_is_complete(tmp_path, monkeypatch):
    from selftrain.sampling.generate import generate
    from selftrain.sampling.shards import ShardedCorpus

    out = tmp_path / "corpus"
    flags = {"model": "tiny:qwen2", "out": str(out), "num_samples": 8, "max_new_tokens": 8,
             "batch_size": 4, "shard_size": 2}
    generate(**flags, seed=0)
    old = read_corpus(out).columns["input_ids"]

    real_write = ShardedCorpus.write_shard
    written = []

    def write_until_ctrl_c(self, index, rows):
        if len(written) == 2:
            raise KeyboardInterrupt
        real_write(self, index, rows)
        written.append(self.out)

    monkeypatch.setattr(ShardedCorpus, "write_shard", write_until_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        generate(**flags, seed=1, overwrite=True)
    assert read_corpus(out).columns["input_ids"] == old  # untouched while the new one fills
    assert {path.name for path in written} == {".corpus.replacement"}

    monkeypatch.setattr(ShardedCorpus, "write_shard", real_write)
    generate(**flags, seed=1, overwrite=True)  # resumes the replacement, then swaps it in
    assert manifest_of(out)["timing"]["samples_this_run"] == 4
    assert manifest_of(out)["generation"]["seed"] == 1
    assert read_corpus(out).columns["input_ids"] != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no sibling left
