"""selftrain.outputs: no command writes over files it did not write, or over its own inputs.

Each case gives a writer an ``--out`` it must refuse, with ``--overwrite true`` (which may only
replace an earlier output of the same kind): a folder of someone's files, a corpus dir with a
file added, a dir that holds an input of the same command, a dir inside one. Each must fail in
one line naming ``--out`` and what is in the way, and leave every file as it was.
"""

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import modes_enforced, one_error_line, selftrain, write_jsonl

from selftrain.curation.decontaminate import decontaminate
from selftrain.curation.replay import replay
from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer
from selftrain.outputs import refuse_unwritable
from selftrain.probes.plant import plant
from selftrain.probes.probeset import probeset
from selftrain.sampling.generate import generate


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def world(tmp_path, qwen_corpus):
    """A user's folder, a corpus in a folder of its own, a local model, sources and canaries."""
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "thesis.txt").write_text("years of work")
    shutil.copytree(qwen_corpus, tmp_path / "inputs" / "corpus")
    added = tmp_path / "added"
    shutil.copytree(qwen_corpus, added)
    (added / "notes.md").write_text("mine")
    model = tmp_path / "models" / "base"
    load_model("tiny:qwen2").save_pretrained(model)
    load_tokenizer("tiny:qwen2").save_pretrained(model)
    (tmp_path / "text").mkdir()
    write_jsonl(tmp_path / "text" / "docs.jsonl", [{"text": "a real document " * 20}] * 40)
    write_jsonl(tmp_path / "bench.jsonl", [{"question": "what is two plus two", "answer": "4"}])
    (tmp_path / "canaries").mkdir()
    write_jsonl(tmp_path / "canaries" / "c.jsonl", [{"text": "x " * 80, "domain": "d"}])
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "table.parquet")
    (tmp_path / "folder.parquet").mkdir()
    return tmp_path


CASES = {
    # command: (call with the world's paths, fragment of the one-line refusal)
    "generate_into_a_users_folder": (
        lambda w: generate("tiny:qwen2", str(w / "documents"), num_samples=4, overwrite=True),
        r"holds files selftrain did not write there \(thesis\.txt\)"),
    "generate_into_a_corpus_with_a_file_added": (
        lambda w: generate("tiny:qwen2", str(w / "added"), num_samples=4, overwrite=True),
        r"holds files selftrain did not write there \(notes\.md\)"),
    "generate_over_the_folder_of_its_local_model": (
        lambda w: generate(str(w / "models" / "base"), str(w / "models"), num_samples=4,
                           overwrite=True),
        r"it holds --model"),
    "decontaminate_over_the_parent_of_its_corpus": (
        lambda w: decontaminate(str(w / "inputs" / "corpus"), str(w / "inputs"),
                                [str(w / "bench.jsonl")], overwrite=True),
        r"it holds --corpus"),
    "decontaminate_inside_its_corpus": (
        lambda w: decontaminate(str(w / "inputs" / "corpus"), str(w / "inputs" / "corpus" / "x"),
                                [str(w / "bench.jsonl")], overwrite=True),
        r"it lies inside --corpus"),
    "decontaminate_into_a_users_folder": (
        lambda w: decontaminate(str(w / "inputs" / "corpus"), str(w / "documents"),
                                [str(w / "bench.jsonl")], overwrite=True),
        r"holds files selftrain did not write there \(thesis\.txt\)"),
    "decontaminate_over_its_benchmark_file": (
        lambda w: decontaminate(str(w / "inputs" / "corpus"), str(w / "bench.jsonl"),
                                [str(w / "bench.jsonl")], overwrite=True),
        r"is --benchmarks itself"),
    "replay_over_the_parent_of_its_match": (
        lambda w: replay(str(w / "inputs" / "corpus"), str(w / "inputs"),
                         str(w / "text" / "docs.jsonl"), "tiny:qwen2", overwrite=True),
        r"it holds --match"),
    "replay_over_the_folder_of_its_sources": (
        lambda w: replay(str(w / "inputs" / "corpus"), str(w / "text"),
                         str(w / "text" / "docs.jsonl"), "tiny:qwen2", overwrite=True),
        r"it holds --sources"),
    "replay_into_a_corpus_with_a_file_added": (
        lambda w: replay(str(w / "inputs" / "corpus"), str(w / "added"),
                         str(w / "text" / "docs.jsonl"), "tiny:qwen2", overwrite=True),
        r"holds files selftrain did not write there \(notes\.md\)"),
    "plant_into_a_users_folder": (
        lambda w: plant("tiny:qwen2", str(w / "canaries" / "c.jsonl"), str(w / "documents"),
                        overwrite=True),
        r"holds files selftrain did not write there \(thesis\.txt\)"),
    "plant_over_the_folder_of_its_canaries": (
        lambda w: plant("tiny:qwen2", str(w / "canaries" / "c.jsonl"), str(w / "canaries"),
                        overwrite=True),
        r"it holds --canaries"),
    "plant_over_the_folder_of_its_base": (
        lambda w: plant(str(w / "models" / "base"), str(w / "canaries" / "c.jsonl"),
                        str(w / "models"), overwrite=True),
        r"it holds --model"),
    "probeset_over_a_parquet_it_did_not_write": (
        lambda w: probeset("tiny:qwen2", [str(w / "canaries" / "c.jsonl")],
                           str(w / "table.parquet"), overwrite=True),
        r"is a file selftrain did not write"),
    "probeset_over_a_directory": (
        lambda w: probeset("tiny:qwen2", [str(w / "canaries" / "c.jsonl")],
                           str(w / "folder.parquet"), overwrite=True),
        r"is a directory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_overwrite_never_replaces_what_selftrain_did_not_write_or_an_input(world, case):
    call, fragment = CASES[case]
    before = snapshot(world)
    with pytest.raises(SelftrainError, match=r"^--out \S+: " + r".*" + fragment):
        call(world)
    assert snapshot(world) == before


def test_overwrite_still_replaces_an_earlier_output_of_the_same_kind(world):
    out = world / "clean"
    decontaminate(str(world / "inputs" / "corpus"), str(out), [str(world / "bench.jsonl")])
    first = snapshot(out)
    decontaminate(str(world / "inputs" / "corpus"), str(out), [str(world / "bench.jsonl")],
                  ngram=4, overwrite=True)
    assert snapshot(out) != first
    assert sorted(p.name for p in out.iterdir()) == ["data", "manifest.json"]


def test_the_cli_refusal_is_one_line_and_exit_2(world):
    done = selftrain("decontaminate", "--corpus", str(world / "inputs" / "corpus"), "--out",
                     str(world / "inputs"), "--benchmarks", str(world / "bench.jsonl"),
                     "--overwrite", "true")
    assert done.returncode == 2
    assert "it holds --corpus" in one_error_line(done.stderr)
    assert (world / "inputs" / "corpus" / "manifest.json").is_file()


def test_an_out_under_a_file_is_refused_wherever_the_file_is(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SelftrainError, match=r"^--out \S+/file/a/b: \S+/file is a file"):
        refuse_unwritable(tmp_path / "file" / "a" / "b")
    refuse_unwritable(tmp_path / "new" / "a" / "b")  # made later, under a writable dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(not modes_enforced(), reason="this process (root) writes into 0o500 dirs")
def test_an_out_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    locked = tmp_path / "locked"
    (locked / "corpus").mkdir(parents=True)
    locked.chmod(0o500)
    try:
        with pytest.raises(SelftrainError, match=r"^--out \S+/locked/new: \S+/locked is not "
                                                 r"writable"):
            refuse_unwritable(locked / "new")
        refuse_unwritable(locked / "corpus", beside=False)  # filled in place: it is writable
        with pytest.raises(SelftrainError, match="locked is not writable"):
            refuse_unwritable(locked / "corpus")  # staged beside it, in the locked dir
    finally:
        locked.chmod(0o700)
