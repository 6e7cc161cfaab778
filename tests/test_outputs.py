"""selftrain.outputs: no command writes over files it did not write, or over its own inputs.

Each case gives a writer an ``--out`` it must refuse, with ``--overwrite true`` (which may only
replace an earlier output of the same kind): a folder of someone's files, a corpus dir with a
file added, a dir that holds an input of the same command, a dir inside one. Each must fail in
one line naming ``--out`` and what is in the way, and leave every file as it was.
"""

import re
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import (
    DEBUG,
    NO_CALLBACKS,
    file_bytes,
    fit_args,
    in_process,
    modes_enforced,
    one_error_line,
    write_jsonl,
)

from selftrain.curation.decontaminate import decontaminate
from selftrain.curation.replay import replay
from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer
from selftrain.outputs import refuse_unwritable
from selftrain.probes.plant import plant
from selftrain.probes.probeset import probeset
from selftrain.sampling.generate import generate


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
    (tmp_path / "lookalike" / "eval").mkdir(parents=True)  # a run's folder names, no run
    (tmp_path / "lookalike" / "eval" / "score.py").write_text("print('my scoring')\n")
    (tmp_path / "lookalike" / "hf").mkdir()
    (tmp_path / "lookalike" / "hf" / "README.md").write_text("my model card\n")
    (tmp_path / "grids").mkdir()
    shutil.copy(DEBUG, tmp_path / "grids" / "fit.yaml")
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


def fit(root: Path, *flags: str) -> list[str]:
    """``selftrain fit`` of the debug config without callbacks into ``root``."""
    return fit_args(root, *flags, callbacks=False)


def validate(root: Path, *flags: str) -> list[str]:
    """``selftrain validate`` of the debug config's student into ``root``."""
    return ["validate", "--config", DEBUG, NO_CALLBACKS, "--trainer.default_root_dir", str(root),
            *flags]


def sweep(out: Path, *flags: str) -> list[str]:
    """``selftrain sweep`` of one tiny source into ``out`` (not a dry run)."""
    return ["sweep", "--out", str(out), "--student", "tiny:qwen2", "--fit_config", DEBUG,
            "--sources", '{"self": {"model": "tiny:qwen2"}}', *flags]


RUN_CASES = {
    # what writes runs: (argv with the world's paths, fragment of the one-line refusal)
    "fit_into_a_folder_with_a_runs_folder_names": (
        lambda w: fit(w / "lookalike"), r"holds files but no selftrain run \(eval, hf\)"),
    "fit_overwrite_into_a_folder_with_a_runs_folder_names": (
        lambda w: fit(w / "lookalike", "--overwrite", "true"),
        r"holds files but no selftrain run \(eval, hf\)"),
    "fit_into_a_users_folder": (
        lambda w: fit(w / "documents", "--overwrite", "true"),
        r"holds files but no selftrain run \(thesis\.txt\)"),
    "fit_into_the_parent_of_its_corpus": (
        lambda w: fit(w / "inputs", "--data.corpus", str(w / "inputs" / "corpus")),
        r"it holds --data\.corpus"),
    "fit_overwrite_into_its_corpus": (
        lambda w: fit(w / "inputs" / "corpus", "--data.corpus", str(w / "inputs" / "corpus"),
                      "--overwrite", "true"),
        r"is --data\.corpus itself"),
    "fit_inside_its_corpus": (
        lambda w: fit(w / "inputs" / "corpus" / "run", "--data.corpus",
                      str(w / "inputs" / "corpus")),
        r"it lies inside --data\.corpus"),
    "fit_into_the_folder_of_its_student": (
        lambda w: fit(w / "models", "--model.model", str(w / "models" / "base")),
        r"it holds --model\.model"),
    "validate_into_a_users_folder": (
        lambda w: validate(w / "documents", "--data.eval_corpus", str(w / "text" / "docs.jsonl")),
        r"holds files but no selftrain run \(thesis\.txt\)"),
    "validate_into_the_folder_of_its_eval_corpus": (
        lambda w: validate(w / "text", "--data.eval_corpus", str(w / "text" / "docs.jsonl")),
        r"it holds --data\.eval_corpus"),
    "sweep_into_a_users_folder": (
        lambda w: sweep(w / "documents"),
        r"^--out \S+: holds files selftrain did not write there \(thesis\.txt\)"),
    "sweep_into_the_folder_of_its_grid_and_fit_config": (
        lambda w: ["sweep", "--out", str(w / "grids"), "--student", "tiny:qwen2",
                   "--fit_config", str(w / "grids" / "fit.yaml"),
                   "--sources", '{"self": {"model": "tiny:qwen2"}}'],
        r"^--out \S+: it holds --fit_config"),
    "sweep_into_its_student": (
        lambda w: [*sweep(w / "models" / "base"), "--student", str(w / "models" / "base")],
        r"^--out \S+: is --student itself"),
    "sweep_into_the_folder_of_its_student": (
        lambda w: [*sweep(w / "models"), "--student", str(w / "models" / "base")],
        r"^--out \S+: it holds --student"),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_no_run_is_written_into_a_users_folder_or_over_an_input(world, case, capsys,
                                                                  monkeypatch):
    from selftrain.cli import main

    build, fragment = RUN_CASES[case]
    argv = build(world)
    monkeypatch.setattr(sys, "argv", ["selftrain", *argv])  # LightningCLI reads it too
    before = file_bytes(world)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    line = one_error_line(capsys.readouterr().err)
    assert exit_info.value.code == 2, line
    assert re.search(fragment, line.removeprefix("selftrain: error: ")), line
    assert file_bytes(world) == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_overwrite_never_replaces_what_selftrain_did_not_write_or_an_input(world, case):
    call, fragment = CASES[case]
    before = file_bytes(world)
    with pytest.raises(SelftrainError, match=r"^--out \S+: " + r".*" + fragment):
        call(world)
    assert file_bytes(world) == before


def test_overwrite_still_replaces_an_earlier_output_of_the_same_kind(world):
    out = world / "clean"
    decontaminate(str(world / "inputs" / "corpus"), str(out), [str(world / "bench.jsonl")])
    first = file_bytes(out)
    decontaminate(str(world / "inputs" / "corpus"), str(out), [str(world / "bench.jsonl")],
                  ngram=4, overwrite=True)
    assert file_bytes(out) != first
    assert sorted(p.name for p in out.iterdir()) == ["data", "manifest.json"]


def test_the_cli_refusal_is_one_line_and_exit_2(world):
    done = in_process("decontaminate", "--corpus", str(world / "inputs" / "corpus"), "--out",
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
