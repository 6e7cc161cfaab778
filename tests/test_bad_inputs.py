"""Every bad input to every `selftrain` subcommand: one error line, exit 2, nothing written.

One table of bad inputs across every subcommand (``fit``, ``validate``, ``test`` and each
tool of ``selftrain --help``): bad flags, corrupt or mis-shaped
files, paths that cannot be used. Each row is run in this process through
:func:`selftrain.cli.main`, as the console script runs it, and must end in exactly one
``selftrain: error: <flag or file>: <what to do>`` line on stderr with exit status 2. An
exception the CLI does not turn into that line propagates out of ``main`` and fails the test
with its traceback, so "no traceback" is checked by running the command itself; stderr is
also searched for one. Every output and run dir points inside the test's ``tmp_path``, whose
tree must be exactly what the row's setup wrote, before and after: a refusal writes nothing.

In-process runs cost no interpreter start or re-import (about 5 s each as subprocesses), so
the table can be long; the heavy modules are imported once per file (:func:`warm_imports`),
outside any test's output capture, so that the handlers Lightning and transformers attach to
stderr at import never point at a closed capture.
"""

from __future__ import annotations

import logging
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    DEBUG,
    DEBUG_CORPUS,
    EXTRACTION,
    exit_status,
    fit_args,
    flip_bytes,
    held_run,
    modes_enforced,
    one_error_line,
    write_jsonl,
)

TMP = "{tmp}"
"""Stands for the test's ``tmp_path`` in a row's argv and expected names."""
RUN = f"{TMP}/run"
BEYOND_64_BITS = str(2**64)


# --- what a row's setup writes into tmp_path ---------------------------------------------------


def corpus_copy(tmp: Path, name: str = "corpus") -> Path:
    """A copy of the debug config's corpus dir, to damage."""
    return Path(shutil.copytree(DEBUG_CORPUS, tmp / name))


def first_shard(corpus: Path) -> Path:
    """The first parquet shard of a corpus dir."""
    return sorted((corpus / "data").glob("*.parquet"))[0]


def garbage_shard(tmp: Path) -> None:
    """A corpus dir whose first shard is not parquet at all."""
    first_shard(corpus_copy(tmp)).write_bytes(b"these bytes are not a parquet file\n" * 20)


def truncated_shard(tmp: Path) -> None:
    """A corpus dir whose first shard was cut short (a copy that died half-way)."""
    shard = first_shard(corpus_copy(tmp))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def flipped_shard(tmp: Path) -> None:
    """A corpus dir whose manifest records its shards' digests, then a shard lost bits."""
    import json

    from selftrain.corpus import shard_digests

    corpus = corpus_copy(tmp)
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["digests"] = shard_digests(corpus)
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    flip_bytes(first_shard(corpus), count=8)


def mismatched_shards(tmp: Path) -> None:
    """A corpus dir with a second shard whose ``text`` column holds integers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = corpus_copy(tmp)
    pq.write_table(pa.table({"id": [1000], "text": [5], "input_ids": [[256, 1, 2]]}),
                   corpus / "data" / "shard-00001-of-00001.parquet")


def manifest(text: str) -> Callable[[Path], None]:
    """A corpus dir whose ``manifest.json`` holds ``text``."""
    def setup(tmp: Path) -> None:
        (corpus_copy(tmp) / "manifest.json").write_text(text)
    return setup


def lost_shard(tmp: Path) -> None:
    """A corpus dir whose manifest records 500 rows in 3 shards, as if two shards were lost."""
    import json

    corpus = corpus_copy(tmp)
    record = json.loads((corpus / "manifest.json").read_text())
    record["counts"] = {**record.get("counts", {}), "written": 500, "shards": 3}
    (corpus / "manifest.json").write_text(json.dumps(record))


def dangling_link(name: str) -> Callable[[Path], None]:
    """A symbolic link ``name`` to a path that does not exist."""
    def setup(tmp: Path) -> None:
        (tmp / name).symlink_to(tmp / "nowhere")
    return setup


def lines(name: str, *raw: str) -> Callable[[Path], None]:
    """A text file ``name`` of these lines."""
    def setup(tmp: Path) -> None:
        (tmp / name).write_text("".join(line + "\n" for line in raw))
    return setup


def rows(name: str, *values: object) -> Callable[[Path], None]:
    """A jsonl file ``name``, one JSON value a line."""
    def setup(tmp: Path) -> None:
        write_jsonl(tmp / name, values)
    return setup


def garbage_file(name: str) -> Callable[[Path], None]:
    """A file ``name`` (a .parquet, say) of bytes that are not what its suffix says."""
    def setup(tmp: Path) -> None:
        (tmp / name).write_bytes(b"PAR1 but not really\n" * 10)
    return setup


def garbage_bytes(name: str) -> Callable[[Path], None]:
    """A file ``name`` of bytes that are not UTF-8 text."""
    def setup(tmp: Path) -> None:
        (tmp / name).write_bytes(b"text \xff\xfe\x80 and not UTF-8\n")
    return setup


def directory(name: str, mode: int | None = None) -> Callable[[Path], None]:
    """An empty directory ``name`` (with ``mode``, 0o500 for a read-only one)."""
    def setup(tmp: Path) -> None:
        (tmp / name).mkdir()
        if mode is not None:
            (tmp / name).chmod(mode)
    return setup


def config_only(tmp: Path) -> None:
    """A model dir (``model``) with tiny:qwen2's config.json and neither weights nor tokenizer."""
    from selftrain.models import load_model

    load_model("tiny:qwen2").config.save_pretrained(tmp / "model")


def mostly_empty(tmp: Path) -> None:
    """40 rows of which 30 have empty text: nothing to train on in most of the corpus."""
    write_jsonl(tmp / "blank.jsonl", [{"text": "the cat sat on the mat." if i % 4 == 0 else ""}
                                      for i in range(40)])


def text_corpus(tmp: Path) -> None:
    """A short real-text corpus (``text.jsonl``): a replay or decontamination input."""
    write_jsonl(tmp / "text.jsonl", [{"text": f"sentence number {i} of a small real corpus. " * 8}
                                     for i in range(240)])


def earlier_run(tmp: Path) -> None:
    """A run dir that holds a run: its marker and TensorBoard events."""
    held_run(tmp / "run")


def saved_dict(name: str) -> Callable[[Path], None]:
    """A torch-saved dict that is not a Lightning checkpoint."""
    def setup(tmp: Path) -> None:
        import torch

        torch.save({"weights": [1, 2, 3]}, tmp / name)
    return setup


def pickled_checkpoint(name: str) -> Callable[[Path], None]:
    """A checkpoint-shaped dict holding an object that loads only by unpickling (a Fraction)."""
    def setup(tmp: Path) -> None:
        from fractions import Fraction

        import torch

        torch.save({"global_step": 3, "state_dict": {}, "note": Fraction(1, 3)}, tmp / name)
    return setup


def damaged_checkpoint(name: str) -> Callable[[Path], None]:
    """A checkpoint saved with its digest, then 64 bytes flipped inside it (bits lost on disk)."""
    def setup(tmp: Path) -> None:
        import torch

        from selftrain.digests import save_with_digest

        state = {"global_step": 3, "state_dict": {"w": torch.arange(4096.0)}}
        save_with_digest(tmp / name, lambda path: torch.save(state, path))
        flip_bytes(tmp / name)
    return setup


def damaged_export(name: str, digests: bool = True) -> Callable[[Path], None]:
    """An HF export of tiny:qwen2 whose ``model.safetensors`` was cut short; with or without
    the ``digests.json`` an export carries."""
    def setup(tmp: Path) -> None:
        from selftrain.digests import DIGESTS_FILE
        from selftrain.models import load_model, load_tokenizer
        from selftrain.training.export import save_hf

        folder = tmp / name
        save_hf(load_model("tiny:qwen2"), load_tokenizer("tiny:qwen2"), folder,
                {"model": "tiny:qwen2", "epoch": 1, "global_step": 24})
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        if not digests:
            (folder / DIGESTS_FILE).unlink()
    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    """Run several setups."""
    def setup(tmp: Path) -> None:
        for one in setups:
            one(tmp)
    return setup


# --- the commands ------------------------------------------------------------------------------


def fit(*flags: str) -> list[str]:
    """``selftrain fit`` on the debug config without its evaluation callbacks, run dir in tmp."""
    return fit_args(Path(RUN), *flags, callbacks=False)


def evaluate(subcommand: str, *flags: str) -> list[str]:
    """``selftrain validate`` or ``test`` on the debug config, run dir in tmp."""
    return [subcommand, *fit(*flags)[1:]]


def generate(*flags: str) -> list[str]:
    """``selftrain generate`` of a few tiny:qwen2 samples into tmp."""
    return ["generate", "--model", "tiny:qwen2", "--out", f"{TMP}/out", "--num_samples", "4",
            "--max_new_tokens", "4", *flags]


def decontaminate(*flags: str) -> list[str]:
    """``selftrain decontaminate`` of the debug corpus against a small benchmark file."""
    return ["decontaminate", "--corpus", DEBUG_CORPUS, "--benchmarks", f"{TMP}/bench.jsonl",
            "--out", f"{TMP}/out", *flags]


def replay(*flags: str) -> list[str]:
    """``selftrain replay`` matching the debug corpus with ``text.jsonl``."""
    return ["replay", "--match", DEBUG_CORPUS, "--sources", f"{TMP}/text.jsonl",
            "--student", "tiny:qwen2", "--out", f"{TMP}/out", *flags]


def probeset(*flags: str) -> list[str]:
    """``selftrain probeset`` of tiny:qwen2 over ``docs.jsonl``."""
    return ["probeset", "--model", "tiny:qwen2", "--inputs", f"[{TMP}/docs.jsonl]",
            "--out", f"{TMP}/probes.parquet", "--prefix_tokens", "8", "--suffix_tokens", "8",
            "--keep", "all", *flags]


def plant(*flags: str) -> list[str]:
    """``selftrain plant`` of tiny:qwen2 with ``canaries.jsonl``."""
    return ["plant", "--model", "tiny:qwen2", "--canaries", f"{TMP}/canaries.jsonl",
            "--out", f"{TMP}/planted", "--prefix_tokens", "8", "--suffix_tokens", "8",
            "--max_epochs", "1", "--precision", "32", *flags]


def proxies(*flags: str) -> list[str]:
    """``selftrain proxies`` of the debug corpus against a small benchmark file."""
    return ["proxies", "--corpus", DEBUG_CORPUS, "--benchmarks", f"{TMP}/bench.jsonl",
            "--out", f"{TMP}/out", *flags]


def pairs(*flags: str) -> list[str]:
    """``selftrain pairs`` of ``docs.jsonl``."""
    return ["pairs", "--corpus", f"{TMP}/docs.jsonl", "--out", f"{TMP}/pairs", *flags]


def synthesize(*flags: str) -> list[str]:
    """``selftrain synthesize`` from tiny:qwen2 seeded by ``docs.jsonl``."""
    return ["synthesize", "--synthesizer", "tiny:qwen2", "--seeds", f"{TMP}/docs.jsonl",
            "--out", f"{TMP}/out", "--num_samples", "2", "--max_new_tokens", "4", *flags]


def pairs_dir(tmp: Path) -> None:
    """A pairs dir as ``selftrain pairs`` writes it, holding two pairs."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp / "pairs" / "data").mkdir(parents=True)
    (tmp / "pairs" / "manifest.json").write_text(json.dumps({"kind": "pairs"}))
    pq.write_table(pa.table({"d1_id": [0, 1], "d2_id": [1, 0], "d1_text": ["a b c", "d e f"],
                             "d2_text": ["d e f", "a b c"], "similarity": [0.9, 0.9],
                             "overlap": [0.0, 0.0]}), tmp / "pairs" / "data" / "pairs.parquet")


def run_config(tmp: Path) -> None:
    """A run dir holding only its config (a fit that never exported)."""
    (tmp / "run" / "tb").mkdir(parents=True)
    shutil.copy(DEBUG, tmp / "run" / "tb" / "config.yaml")


def swap(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with the value after ``flag`` replaced."""
    at = argv.index(flag) + 1
    return [*argv[:at], value, *argv[at + 1:]]


BENCH = rows("bench.jsonl", {"question": "what is the capital of france", "answer": "paris"})
DOCS = rows("docs.jsonl", *({"domain": "text", "text": "a long enough line of text " * 4}
                            for _ in range(3)))
CANARIES = rows("canaries.jsonl", *({"domain": "c", "text": f"canary {i} " * 6}
                                    for i in range(4)))


@dataclass(frozen=True)
class Bad:
    """One bad input.

    Args:
        id: the test id.
        argv: the command line without ``selftrain``; ``{tmp}`` is the test's tmp_path.
        names: what the error line must hold: the flag, or the file, or both (``{tmp}`` too).
        setup: writes the row's files into tmp_path first.
        needs_permissions: relies on a directory's mode, which root ignores.
        waits_for: why the row still fails (a strict xfail), until the named change is in.
    """

    id: str
    argv: list[str]
    names: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    needs_permissions: bool = False
    waits_for: str | None = None


def bad(id: str, argv: list[str], *names: str, setup: Callable[[Path], None] | None = None,
        needs_permissions: bool = False, waits_for: str | None = None) -> Bad:
    """A table row (see :class:`Bad`)."""
    return Bad(id, argv, names, setup, needs_permissions, waits_for)


SWEEP_SOURCE = '{"self": {"model": "tiny:qwen2"}}'


def sweep(sources: str, *flags: str) -> list[str]:
    """A ``selftrain sweep`` row: the debug fit config, ``sources``, then ``flags``."""
    return ["sweep", "--out", f"{TMP}/sweep", "--student", "tiny:qwen2", "--fit_config", DEBUG,
            "--sources", sources, "--dry_run", "true", *flags]


CASES = [
    # -- corpus files read by fit / validate / test (selftrain.corpus.read_corpus) ---------------
    bad("fit-shard-garbage", fit("--data.corpus", f"{TMP}/corpus"), "shard-00000",
        "regenerate", setup=garbage_shard),
    bad("fit-shard-bits-flipped", fit("--data.corpus", f"{TMP}/corpus"), "--data.corpus",
        "data/shard-", "does not match its saved digest", setup=flipped_shard),
    bad("fit-shard-truncated", fit("--data.corpus", f"{TMP}/corpus"), "shard-00000",
        setup=truncated_shard),
    bad("fit-shards-mismatched", fit("--data.corpus", f"{TMP}/corpus"), f"{TMP}/corpus",
        setup=mismatched_shards),
    bad("fit-corpus-lost-shards", fit("--data.corpus", f"{TMP}/corpus"), f"{TMP}/corpus",
        "500 rows in 3 shard(s)", "192 rows in 1 shard(s)", setup=lost_shard),
    bad("proxies-corpus-lost-shards", swap(proxies(), "--corpus", f"{TMP}/corpus"),
        "--corpus", "500 rows", setup=both(BENCH, lost_shard)),
    bad("fit-second-config-not-yaml", fit("--config", f"{TMP}/more.yaml"), "--config",
        "more.yaml", "line 3", setup=lines("more.yaml", "trainer:", "  max_epochs: 2",
                                            " bad: [")),
    bad("fit-config-empty", fit("--config", f"{TMP}/more.yaml"), "--config", "more.yaml",
        "empty", setup=lines("more.yaml")),
    bad("sweep-grid-not-yaml", ["sweep", "--config", f"{TMP}/grid.yaml"], "--config",
        "grid.yaml", "line 2", setup=lines("grid.yaml", "out: x", " - y: [")),
    bad("fit-manifest-not-json", fit("--data.corpus", f"{TMP}/corpus"), "manifest.json",
        setup=manifest('{"format": "selftrain-corpus/1", ')),
    bad("fit-manifest-not-object", fit("--data.corpus", f"{TMP}/corpus"), "manifest.json",
        setup=manifest("[1, 2, 3]\n")),
    bad("fit-jsonl-line-not-json", fit("--data.corpus", f"{TMP}/c.jsonl"), "c.jsonl", "line 2",
        setup=lines("c.jsonl", '{"text": "fine"}', '{"text": "cut short', '{"text": "x"}')),
    bad("fit-jsonl-line-not-object", fit("--data.corpus", f"{TMP}/c.jsonl"), "c.jsonl",
        "line 2", setup=lines("c.jsonl", '{"text": "fine"}', "[1, 2]")),
    bad("fit-jsonl-empty", fit("--data.corpus", f"{TMP}/c.jsonl"), "c.jsonl",
        setup=lines("c.jsonl")),
    bad("fit-text-number", fit("--data.corpus", f"{TMP}/c.jsonl"), "c.jsonl", "text",
        setup=rows("c.jsonl", {"text": "fine text"}, {"text": 5})),
    bad("fit-text-list", fit("--data.corpus", f"{TMP}/c.jsonl"), "c.jsonl", "text",
        setup=rows("c.jsonl", {"text": ["a", "list"]})),
    bad("fit-ids-strings", fit("--data.corpus", f"{TMP}/c.jsonl", "--data.same_tokenizer",
                               "true"), "c.jsonl", "input_ids",
        setup=rows("c.jsonl", {"input_ids": ["a", "b", "c"]})),
    bad("fit-ids-negative", fit("--data.corpus", f"{TMP}/c.jsonl", "--data.same_tokenizer",
                                "true"), "c.jsonl", "input_ids",
        setup=rows("c.jsonl", *({"input_ids": [256, 5, -3, 7]} for _ in range(16)))),
    bad("fit-ids-not-a-list", fit("--data.corpus", f"{TMP}/c.jsonl", "--data.same_tokenizer",
                                  "true"), "c.jsonl", "input_ids",
        setup=rows("c.jsonl", {"input_ids": 7})),
    bad("fit-ids-floats", fit("--data.corpus", f"{TMP}/c.jsonl", "--data.same_tokenizer",
                              "true"), "c.jsonl", "input_ids",
        setup=rows("c.jsonl", *({"input_ids": [256, 1.5, 2.0]} for _ in range(16)))),
    bad("fit-plain-parquet-garbage", fit("--data.corpus", f"{TMP}/c.parquet"), "c.parquet",
        setup=garbage_file("c.parquet")),
    bad("fit-mostly-empty-text", fit("--data.corpus", f"{TMP}/blank.jsonl"), "blank.jsonl",
        "30 of 40", setup=mostly_empty),
    bad("fit-eval-corpus-not-json", fit("--data.eval_corpus", f"{TMP}/e.jsonl"), "e.jsonl",
        "line 1", setup=lines("e.jsonl", "not json")),
    bad("validate-eval-shard-garbage", evaluate("validate", "--data.eval_corpus",
                                                f"{TMP}/corpus"), "shard-00000",
        setup=garbage_shard),
    bad("test-eval-text-number", evaluate("test", "--data.eval_corpus", f"{TMP}/e.jsonl"),
        "e.jsonl", setup=rows("e.jsonl", {"text": 3.5})),
    # -- the student and data flags of fit -----------------------------------------------------
    bad("fit-model-dir-without-config", fit("--model.model", f"{TMP}/empty"),
        "--model.model", "config.json", setup=directory("empty")),
    bad("fit-model-dir-without-tokenizer", fit("--model.model", f"{TMP}/model"),
        "--model.model", "tokenizer", setup=config_only),
    bad("fit-model-is-a-file", fit("--model.model", f"{TMP}/weights.bin"), "--model.model",
        setup=garbage_file("weights.bin")),
    bad("fit-pad-to-multiple-0", fit("--data.pad_to_multiple_of", "0"),
        "--data.pad_to_multiple_of"),
    bad("fit-group-batches-negative", fit("--data.group_batches", "-1"),
        "--data.group_batches"),
    bad("fit-num-workers-negative", fit("--data.num_workers", "-1"), "--data.num_workers"),
    bad("fit-data-seed-beyond-64-bits", fit("--data.seed", BEYOND_64_BITS), "--data.seed"),
    bad("fit-data-seed-negative", fit("--data.seed", "-1"), "--data.seed"),
    bad("fit-bos-negative", fit("--data.same_tokenizer", "false", "--data.bos_token_id", "-1"),
        "--data.bos_token_id"),
    bad("fit-bos-outside-vocabulary", fit("--data.same_tokenizer", "false",
                                          "--data.bos_token_id", "100000"),
        "--data.bos_token_id"),
    bad("fit-min-real-token-fraction", fit("--data.min_real_token_fraction", "1.5"),
        "--data.min_real_token_fraction"),
    bad("fit-loss-chunk-0", fit("--model.loss_chunk", "0"), "--model.loss_chunk", "must be >= 1"),
    bad("fit-loss-kernel-liger-unchunked", fit("--model.loss_kernel", "liger"),
        "--model.loss_kernel", "--model.loss_chunk"),
    bad("fit-loss-kernel-liger-here", fit("--model.loss_chunk", "64", "--model.loss_kernel",
                                          "liger"), "--model.loss_kernel"),
    # -- trainer and checkpoint flags (selftrain.training.flags) -------------------------------
    bad("fit-devices-0", fit("--trainer.devices", "0"), "--trainer.devices"),
    bad("fit-devices-negative", fit("--trainer.devices", "-2"), "--trainer.devices"),
    bad("fit-devices-empty-list", fit("--trainer.devices", "[]"), "--trainer.devices"),
    bad("fit-devices-all-on-cpu", fit("--trainer.devices", "-1"), "--trainer.devices", "CPU"),
    bad("fit-every-n-train-steps-negative", fit("--checkpoint.every_n_train_steps", "-1"),
        "--checkpoint.every_n_train_steps"),
    bad("fit-every-n-epochs-negative", fit("--checkpoint.every_n_epochs", "-1"),
        "--checkpoint.every_n_epochs"),
    bad("fit-max-epochs-infinite", fit("--trainer.max_epochs", "-1"), "--trainer.max_epochs",
        "--trainer.max_steps"),
    bad("fit-max-steps-negative", fit("--trainer.max_steps", "-5"), "--trainer.max_steps"),
    bad("fit-accumulate-grad-batches-0", fit("--trainer.accumulate_grad_batches", "0"),
        "--trainer.accumulate_grad_batches"),
    bad("fit-num-nodes-0", fit("--trainer.num_nodes", "0"), "--trainer.num_nodes"),
    bad("fit-max-epochs-0", fit("--trainer.max_epochs", "0"), "--trainer.max_epochs"),
    bad("fit-max-steps-0", fit("--trainer.max_steps", "0"), "--trainer.max_steps"),
    bad("fit-min-epochs-negative", fit("--trainer.min_epochs", "-3"), "--trainer.min_epochs"),
    bad("fit-val-check-interval-0", fit("--trainer.val_check_interval", "0"),
        "--trainer.val_check_interval"),
    bad("fit-check-val-every-n-epoch-0", fit("--trainer.check_val_every_n_epoch", "0"),
        "--trainer.check_val_every_n_epoch"),
    bad("fit-limit-train-batches-negative", fit("--trainer.limit_train_batches", "-1"),
        "--trainer.limit_train_batches"),
    bad("fit-log-every-n-steps-negative", fit("--trainer.log_every_n_steps", "-1"),
        "--trainer.log_every_n_steps"),
    bad("fit-gradient-clip-negative", fit("--trainer.gradient_clip_val", "-1"),
        "--trainer.gradient_clip_val"),
    bad("fit-sanity-steps-negative", fit("--trainer.num_sanity_val_steps", "-5"),
        "--trainer.num_sanity_val_steps"),
    bad("fit-save-top-k-below-minus-1", fit("--checkpoint.save_top_k", "-2"),
        "--checkpoint.save_top_k"),
    bad("fit-checkpoint-two-triggers", fit("--checkpoint.every_n_epochs", "1"),
        "--checkpoint.every_n_epochs", "--checkpoint.every_n_train_steps"),
    bad("fit-seed-everything-beyond-32-bits", fit("--seed_everything", BEYOND_64_BITS),
        "--seed_everything"),
    bad("fit-txt-not-utf8", fit("--data.corpus", f"{TMP}/c.txt"), "c.txt", "UTF-8",
        setup=garbage_bytes("c.txt")),
    bad("fit-subset-outside", fit("--data.subset", "5"), "--data.subset"),
    bad("fit-probe-set-line-not-object", fit(f"--trainer.callbacks+={EXTRACTION}",
                                             "--probes.probe_set", f"{TMP}/probes.jsonl"),
        "--probes.probe_set", "probes.jsonl", "line 2",
        setup=lines("probes.jsonl", '{"text": "a"}', "[1]")),
    bad("validate-without-eval-corpus", evaluate("validate"), "--data.eval_corpus"),
    bad("test-model-dir-without-config", evaluate("test", "--model.model", f"{TMP}/empty",
                                                  "--data.eval_corpus", DEBUG_CORPUS),
        "--model.model", "config.json", setup=directory("empty")),
    # -- the run dir and the checkpoint to resume (selftrain.training.run_dir) -----------------
    bad("fit-run-dir-holds-a-run", fit(), "--trainer.default_root_dir", "--ckpt_path last",
        setup=earlier_run),
    bad("fit-run-dir-is-a-file", fit(), "--trainer.default_root_dir",
        setup=garbage_file("run")),
    bad("fit-run-dir-read-only", fit("--trainer.default_root_dir", f"{TMP}/ro/run"),
        "--trainer.default_root_dir", setup=directory("ro", 0o500), needs_permissions=True),
    bad("fit-ckpt-missing", fit("--ckpt_path", f"{TMP}/none.ckpt"), "--ckpt_path",
        f"{TMP}/none.ckpt"),
    bad("fit-ckpt-truncated", fit("--ckpt_path", f"{TMP}/cut.ckpt"), "--ckpt_path",
        "truncated", setup=garbage_file("cut.ckpt")),
    bad("fit-ckpt-not-a-checkpoint", fit("--ckpt_path", f"{TMP}/dict.ckpt"), "--ckpt_path",
        "not a Lightning checkpoint", setup=saved_dict("dict.ckpt")),
    bad("fit-ckpt-bits-flipped", fit("--ckpt_path", f"{TMP}/flipped.ckpt"), "--ckpt_path",
        f"{TMP}/flipped.ckpt", "digest", setup=damaged_checkpoint("flipped.ckpt")),
    bad("validate-ckpt-bits-flipped", evaluate("validate", "--data.eval_corpus", DEBUG_CORPUS,
                                               "--ckpt_path", f"{TMP}/flipped.ckpt"),
        "--ckpt_path", "digest", setup=damaged_checkpoint("flipped.ckpt")),
    bad("test-ckpt-bits-flipped", evaluate("test", "--data.eval_corpus", DEBUG_CORPUS,
                                           "--ckpt_path", f"{TMP}/flipped.ckpt"),
        "--ckpt_path", "digest", setup=damaged_checkpoint("flipped.ckpt")),
    bad("fit-ckpt-last-and-overwrite", fit("--ckpt_path", "last", "--overwrite", "true"),
        "--overwrite true", "--ckpt_path last", setup=earlier_run),
    bad("fit-ckpt-needs-unpickling", fit("--ckpt_path", f"{TMP}/pickled.ckpt"), "--ckpt_path",
        "--weights_only false", setup=pickled_checkpoint("pickled.ckpt")),
    bad("validate-ckpt-truncated", evaluate("validate", "--data.eval_corpus", DEBUG_CORPUS,
                                            "--ckpt_path", f"{TMP}/cut.ckpt"),
        "--ckpt_path", setup=garbage_file("cut.ckpt")),
    # -- what the parsers and Lightning refuse --------------------------------------------------
    bad("fit-flag-of-the-wrong-type", fit("--data.batch_size", "abc"), "--data.batch_size"),
    bad("fit-unknown-flag", fit("--data.bogus", "1"), "--data.bogus"),
    bad("fit-unknown-strategy", fit("--trainer.strategy", "bogus"), "--trainer", "bogus"),
    bad("generate-flag-of-the-wrong-type", generate("--num_samples", "abc"), "--num_samples"),
    bad("replay-unknown-flag", replay("--nope", "1"), "--nope"),
    # -- generate ------------------------------------------------------------------------------
    bad("generate-num-samples-0", generate("--num_samples", "0"), "--num_samples"),
    bad("generate-num-samples-beyond-the-disk", generate("--num_samples", str(10**18)),
        "--num_samples", "GiB on disk"),
    bad("generate-max-new-tokens-0", generate("--max_new_tokens", "0"), "--max_new_tokens"),
    bad("generate-max-new-tokens-beyond-the-model", swap(generate(), "--max_new_tokens",
                                                         "1000000000000"),
        "--max_new_tokens", "at most 511"),
    bad("generate-out-dangling-link", swap(generate(), "--out", f"{TMP}/link"), "--out",
        "symbolic link", setup=dangling_link("link")),
    bad("generate-temperature-0", generate("--temperature", "0"), "--temperature"),
    bad("generate-top-p-above-1", generate("--top_p", "1.5"), "--top_p"),
    bad("generate-shard-size-0", generate("--shard_size", "0"), "--shard_size"),
    bad("generate-top-k-negative", generate("--top_k", "-1"), "--top_k"),
    bad("generate-batch-size-0", generate("--batch_size", "0"), "--batch_size"),
    bad("generate-host-every-0", generate("--host_every", "0"), "--host_every", "must be >= 1"),
    bad("generate-cuda-graph-on-a-cpu", generate("--cuda_graph", "true", "--device", "cpu"),
        "--cuda_graph", "--device resolves to cpu"),
    bad("generate-temperature-twice", generate("--temperature", "[1.0, 1.0]"), "--temperature"),
    bad("generate-device-cuda-index", generate("--device", "cuda:3"), "--device"),
    bad("generate-seed-beyond-64-bits", generate("--seed", BEYOND_64_BITS), "--seed"),
    bad("generate-seed-negative", generate("--seed", "-1"), "--seed"),
    bad("generate-device-cuda-without-cuda", generate("--device", "cuda"), "--device"),
    bad("generate-device-unknown", generate("--device", "gpu0"), "--device"),
    bad("generate-dtype-unknown", generate("--dtype", "float8"), "--dtype"),
    bad("generate-bos-outside-model", generate("--bos_token_id", "100000"), "--bos_token_id"),
    bad("generate-model-dir-without-config", generate("--model", f"{TMP}/empty"), "--model",
        "config.json", setup=directory("empty")),
    bad("generate-model-dir-without-tokenizer", generate("--model", f"{TMP}/model"), "--model",
        "tokenizer", setup=config_only),
    bad("generate-model-not-on-hub-offline", generate("--model", "nobody/no-such-model"),
        "--model"),
    bad("generate-out-is-a-file", generate(), f"{TMP}/out", setup=lines("out", "a file")),
    bad("generate-out-read-only", swap(generate(), "--out", f"{TMP}/ro/out"),
        "--out", setup=directory("ro", 0o500), needs_permissions=True),
    # -- decontaminate -------------------------------------------------------------------------
    bad("decontaminate-ngram-0", decontaminate("--ngram", "0"), "--ngram", setup=BENCH),
    bad("decontaminate-benchmark-missing", decontaminate(), "--benchmarks"),
    bad("decontaminate-limit-0", decontaminate("--limit", "0"), "--limit", setup=BENCH),
    bad("decontaminate-benchmark-yaml-without-task",
        swap(decontaminate(), "--benchmarks", f"{TMP}/task.yaml"), "--benchmarks",
        setup=lines("task.yaml", "dataset_path: json", "output_type: generate_until")),
    bad("decontaminate-benchmark-line-not-json", decontaminate(), "--benchmarks", "line 1",
        setup=lines("bench.jsonl", "{oops")),
    bad("decontaminate-corpus-shard-garbage",
        swap(decontaminate(), "--corpus", f"{TMP}/corpus"), "shard-00000",
        setup=both(BENCH, garbage_shard)),
    bad("decontaminate-corpus-line-not-json",
        swap(decontaminate(), "--corpus", f"{TMP}/c.jsonl"), "c.jsonl", "line 1",
        setup=both(BENCH, lines("c.jsonl", "text, not json"))),
    bad("decontaminate-corpus-text-number",
        swap(decontaminate(), "--corpus", f"{TMP}/c.jsonl"), "c.jsonl",
        setup=both(BENCH, rows("c.jsonl", {"text": 12}))),
    bad("decontaminate-out-read-only", swap(decontaminate(), "--out", f"{TMP}/ro/out"),
        "--out", setup=both(BENCH, directory("ro", 0o500)), needs_permissions=True),
    # -- replay --------------------------------------------------------------------------------
    bad("replay-tolerance-1", replay("--tolerance", "1"), "--tolerance", setup=text_corpus),
    bad("replay-source-missing", replay(), "--sources"),
    bad("replay-source-line-not-json", replay(), "text.jsonl", "line 2",
        setup=lines("text.jsonl", '{"text": "one document"}', "{broken")),
    bad("replay-source-json-not-json", swap(replay(), "--sources", f"{TMP}/docs.json"),
        "docs.json", setup=lines("docs.json", "[{\"text\": \"a\"},")),
    bad("replay-source-parquet-garbage", swap(replay(), "--sources", f"{TMP}/docs.parquet"),
        "docs.parquet", setup=garbage_file("docs.parquet")),
    bad("replay-match-shard-garbage", swap(replay(), "--match", f"{TMP}/corpus"),
        "shard-00000", setup=both(text_corpus, garbage_shard)),
    bad("replay-match-missing-new-parent",
        swap(swap(replay(), "--match", f"{TMP}/nothing"), "--out", f"{TMP}/new/out"),
        "--match", setup=text_corpus),
    bad("replay-student-dir-without-config", swap(replay(), "--student", f"{TMP}/empty"),
        "--student", "config.json", setup=both(text_corpus, directory("empty"))),
    bad("replay-seed-negative", replay("--seed", "-1"), "--seed", setup=text_corpus),
    bad("replay-bos-negative", replay("--bos_token_id", "-4"), "--bos_token_id",
        setup=text_corpus),
    bad("replay-bos-outside-vocabulary", replay("--bos_token_id", "100000"), "--bos_token_id",
        setup=text_corpus),
    bad("replay-shard-size-0", replay("--shard_size", "0"), "--shard_size", setup=text_corpus),
    bad("replay-num-subsets-0", replay("--num_subsets", "0"), "--num_subsets",
        setup=text_corpus),
    bad("replay-text-field-absent", replay("--text_field", "body"), "--text_field",
        setup=text_corpus),
    bad("replay-out-read-only", swap(replay(), "--out", f"{TMP}/ro/out"), "--out",
        setup=both(text_corpus, directory("ro", 0o500)), needs_permissions=True),
    # -- probeset ------------------------------------------------------------------------------
    bad("probeset-prefix-tokens-0", probeset("--prefix_tokens", "0"), "--prefix_tokens",
        setup=DOCS),
    bad("probeset-out-not-parquet", swap(probeset(), "--out", f"{TMP}/probes.csv"),
        "--out", setup=DOCS),
    bad("probeset-input-matches-nothing", probeset(), "--inputs"),
    bad("probeset-input-line-not-json", probeset(), "docs.jsonl", "line 1",
        setup=lines("docs.jsonl", "{not json")),
    bad("probeset-input-row-not-object", probeset(), "docs.jsonl", "line 1",
        setup=lines("docs.jsonl", '"a string row"')),
    bad("probeset-input-text-number", probeset(), "docs.jsonl", "text",
        setup=rows("docs.jsonl", {"domain": "d", "text": 10**30})),
    bad("probeset-input-parquet-garbage",
        swap(probeset(), "--inputs", f"[{TMP}/docs.parquet]"), "docs.parquet",
        setup=garbage_file("docs.parquet")),
    bad("probeset-max-windows-0", probeset("--max_windows", "0"), "--max_windows",
        setup=DOCS),
    bad("probeset-max-windows-negative", probeset("--max_windows", "-1"), "--max_windows",
        setup=DOCS),
    bad("probeset-seed-negative", probeset("--seed", "-1"), "--seed", setup=DOCS),
    bad("probeset-out-not-a-probe-set", probeset(), "--out",
        setup=both(DOCS, garbage_file("probes.parquet"))),
    bad("probeset-model-dir-without-config", swap(probeset(), "--model", f"{TMP}/empty"),
        "--model", "config.json", setup=both(DOCS, directory("empty"))),
    bad("probeset-out-read-only", swap(probeset(), "--out", f"{TMP}/ro/p.parquet"),
        "--out", setup=both(DOCS, directory("ro", 0o500)), needs_permissions=True),
    # -- plant ---------------------------------------------------------------------------------
    bad("plant-target-0", plant("--target", "0"), "--target", setup=CANARIES),
    bad("plant-prefix-tokens-0", plant("--prefix_tokens", "0"), "--prefix_tokens",
        setup=CANARIES),
    bad("plant-canaries-missing", plant(), "--canaries"),
    bad("plant-lr-0", plant("--lr", "0"), "--lr", setup=CANARIES),
    bad("plant-canaries-line-not-object", plant(), "canaries.jsonl", "line 1",
        setup=lines("canaries.jsonl", "[1, 2, 3]")),
    bad("plant-canaries-parquet-garbage", swap(plant(), "--canaries", f"{TMP}/c.parquet"),
        "c.parquet", setup=garbage_file("c.parquet")),
    bad("plant-canaries-wrong-columns", plant(), "canaries.jsonl",
        setup=rows("canaries.jsonl", {"domain": "c", "body": "no text column"})),
    bad("plant-canaries-empty", plant(), "canaries.jsonl", setup=lines("canaries.jsonl")),
    bad("plant-canaries-ids-strings", plant(), "canaries.jsonl", "input_ids",
        setup=rows("canaries.jsonl", *({"domain": "c", "input_ids": ["x"] * 16}
                                       for _ in range(2)))),
    bad("plant-canaries-text-number", plant(), "canaries.jsonl", "text",
        setup=rows("canaries.jsonl", {"domain": "c", "text": 12})),
    bad("plant-seed-beyond-64-bits", plant("--seed", BEYOND_64_BITS), "--seed",
        setup=CANARIES),
    bad("plant-model-dir-without-config", swap(plant(), "--model", f"{TMP}/empty"),
        "--model", "config.json", setup=both(CANARIES, directory("empty"))),
    bad("plant-out-read-only", swap(plant(), "--out", f"{TMP}/ro/planted"), "--out",
        setup=both(CANARIES, directory("ro", 0o500)), needs_permissions=True),
    bad("proxies-no-benchmarks", swap(proxies(), "--benchmarks", "[]"), "--benchmarks"),
    bad("proxies-embedding-model-missing", proxies("--embedding_model", f"{TMP}/no_model"),
        "--embedding_model", setup=BENCH),
    bad("proxies-threshold-above-1", proxies("--threshold", "1.5"), "--threshold",
        setup=BENCH),
    bad("proxies-cells-without-student", proxies("--cells_out", f"{TMP}/cells"), "--cells_out",
        "--student", setup=BENCH),
    bad("fit-base-evaluations-missing", fit("--base_evaluations", f"{TMP}/nothing"),
        "--base_evaluations", "selftrain evaluate"),
    bad("findings-sweep-without-fits", ["findings", "--sweep", f"{TMP}/empty", "--out",
                                        f"{TMP}/out"], "--sweep", "self_t1.0",
        setup=directory("empty")),
    bad("evaluate-not-a-run", ["evaluate", "--run", TMP], "--run"),
    bad("evaluate-export-truncated", ["evaluate", "--run", RUN, "--out", f"{TMP}/out"], "--run",
        "model.safetensors", "digest", setup=both(run_config, damaged_export("run/hf/epoch=1"))),
    bad("generate-model-export-truncated", swap(generate(), "--model", f"{TMP}/export"),
        "--model", "model.safetensors", setup=damaged_export("export")),
    bad("generate-model-export-truncated-without-digests", swap(generate(), "--model",
                                                                f"{TMP}/export"),
        "--model", "truncated", setup=damaged_export("export", digests=False)),
    bad("evaluate-no-exports", ["evaluate", "--run", RUN, "--out", f"{TMP}/out"], "--run",
        "hf/epoch=N", setup=run_config),
    bad("evaluate-model-without-out", ["evaluate", "--model", "tiny:qwen2", "--fit_config",
                                       DEBUG], "--out"),
    bad("report-no-event-files", ["report", "--runs", f"[{TMP}/empty]", "--out",
                                  f"{TMP}/report"], "--runs", setup=directory("empty")),
    bad("report-proxies-without-summary", ["report", "--runs", f"[{RUN}]", "--out",
                                           f"{TMP}/report", "--proxies", f"[{TMP}/empty]"],
        "--proxies", setup=both(run_config, directory("empty"))),
    bad("sweep-unknown-model", sweep('{"self": {"model": "tiny:nope"}}'),
        "--sources.self.model", "tiny:nope"),
    bad("sweep-out-is-a-file", swap(sweep(SWEEP_SOURCE, "--dry_run", "false"), "--out",
                                     f"{TMP}/notes.txt"),
        "--out", f"{TMP}/notes.txt", setup=lines("notes.txt", "a file")),
    bad("sweep-subsets-0", sweep(SWEEP_SOURCE, "--num_subsets", "0"), "--num_subsets 0"),
    bad("sweep-temperature-0", sweep('{"self": {"model": "tiny:qwen2", "temperatures": [0.0]}}'),
        "--sources.self.temperatures", "0.0"),
    bad("sweep-same-run-dir",
        sweep('{"self": {"model": "tiny:qwen2", "temperatures": [1, 1.0]}}'),
        "--sources.self.temperatures", "self_t1.0"),
    bad("sweep-fit-does-not-parse", sweep(SWEEP_SOURCE, "--fit", '{"trainer.max_epochz": 2}'),
        "--fit_config", "trainer.max_epochz"),
    bad("configs-out-is-a-file", ["configs", "--out", f"{TMP}/notes.txt"], "--out",
        f"{TMP}/notes.txt", setup=lines("notes.txt", "a file")),
    bad("configs-out-holds-configs", ["configs", "--out", TMP], "--out", f"{TMP}/configs",
        "never replaced", setup=both(directory("configs"), lines("configs/debug.yaml", "x: 1"))),
    # -- SBP: pairs, the synthesizer's data, synthesize, mixtures --------------------------------
    bad("pairs-one-document", swap(pairs(), "--corpus", f"{TMP}/one.jsonl"), "--corpus",
        "at least two", setup=rows("one.jsonl", {"text": "the only document"})),
    bad("pairs-threshold-above-1", pairs("--threshold", "1.5"), "--threshold", setup=DOCS),
    bad("pairs-threshold-below-minus-1", pairs("--threshold", "-1.01"), "--threshold",
        setup=DOCS),
    bad("pairs-max-overlap-0", pairs("--max_overlap", "0"), "--max_overlap", setup=DOCS),
    bad("fit-pairs-separator-empty", fit("--data.corpus", f"{TMP}/pairs",
                                         "--data.pair_separator", ""),
        "--data.pair_separator", setup=pairs_dir),
    bad("fit-pairs-max-length-too-short", fit("--data.corpus", f"{TMP}/pairs",
                                              "--data.max_length", "8"),
        "--data.max_length", setup=pairs_dir),
    bad("fit-mixture-weights-sum-0", fit("--data.corpus", f"[{DEBUG_CORPUS}, {DEBUG_CORPUS}]",
                                         "--data.mixture_weights", "[0, 0]"),
        "--data.mixture_weights", "positive"),
    bad("fit-mixture-weight-negative", fit("--data.corpus", f"[{DEBUG_CORPUS}, {DEBUG_CORPUS}]",
                                           "--data.mixture_weights", "[2, -1]"),
        "--data.mixture_weights"),
    bad("fit-mixture-weights-per-corpus", fit("--data.mixture_weights", "[0.5, 0.5]"),
        "--data.mixture_weights", "one weight per corpus"),
    bad("fit-mixture-tokens-beyond-memory", fit("--data.corpus",
                                                f"[{DEBUG_CORPUS}, {DEBUG_CORPUS}]",
                                                "--data.mixture_weights", "[0.5, 0.5]",
                                                "--data.mixture_tokens", str(10**15)),
        "--data.mixture_tokens", "GiB"),
    bad("fit-mixture-tokens-without-weights", fit("--data.mixture_tokens", "1000"),
        "--data.mixture_tokens", "--data.mixture_weights"),
    bad("pairs-string-ids", pairs(), "--corpus", "integer",
        setup=rows("docs.jsonl", {"id": "a", "text": "one document"},
                   {"id": "b", "text": "another document"})),
    bad("synthesize-no-pair-layout", synthesize(), "--separator", setup=DOCS),
    bad("synthesize-longer-than-the-context",
        synthesize("--separator", "|", "--max_d1_tokens", "8", "--max_new_tokens", "1000000"),
        "--max_new_tokens", "context", setup=DOCS),
    bad("synthesize-separator-empty", synthesize("--separator", "", "--max_d1_tokens", "8"),
        "--separator", setup=DOCS),
    bad("synthesize-seeds-missing", synthesize("--separator", "|", "--max_d1_tokens", "8"),
        "--seeds"),
    bad("synthesize-temperature-0", synthesize("--temperature", "0"), "--temperature"),
    bad("synthesize-host-every-negative", synthesize("--host_every", "-3"), "--host_every"),
    bad("synthesize-cuda-graph-on-a-cpu", synthesize("--cuda_graph", "true", "--device", "cpu"),
        "--cuda_graph", "CUDA device"),
    bad("synthesize-num-samples-0", synthesize("--num_samples", "0"), "--num_samples"),
    bad("synthesize-num-samples-beyond-the-disk",
        synthesize("--separator", "|", "--max_d1_tokens", "8", "--num_samples", str(10**18)),
        "--num_samples", "GiB on disk", setup=DOCS),
    bad("fit-max-steps-0-points-at-evaluate", fit("--trainer.max_steps", "0"),
        "--trainer.max_steps", "selftrain evaluate --model SPEC --fit_config CONFIG --out DIR"),
    bad("fit-max-epochs-0-points-at-evaluate", fit("--trainer.max_epochs", "0"),
        "--trainer.max_epochs", "selftrain evaluate --model SPEC --fit_config CONFIG --out DIR"),
    bad("fit-benchmark-task-every-n-epochs-0",
        fit("--trainer.callbacks+=selftrain.callbacks.benchmark_eval.BenchmarkEval",
            "--trainer.callbacks.tasks={selftrain_facts: {num_fewshot: 1, every_n_epochs: 0}}"),
        "BenchmarkEval.tasks selftrain_facts", "every_n_epochs 0"),
]


# --- running a row -----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def warm_imports() -> None:
    """Import what the commands import, once, outside any test's stderr capture."""
    import selftrain.curation.decontaminate  # noqa: F401
    import selftrain.curation.replay  # noqa: F401
    import selftrain.probes.plant  # noqa: F401
    import selftrain.probes.probeset  # noqa: F401
    import selftrain.sampling.generate  # noqa: F401
    import selftrain.synthesis.pairs  # noqa: F401
    import selftrain.synthesis.synthesize  # noqa: F401
    import selftrain.trainer_cli  # noqa: F401


@pytest.fixture
def selftrain_log(capsys) -> None:
    """The ``selftrain`` logger writing to this test's captured stderr (as the CLI sets it)."""
    log = logging.getLogger("selftrain")
    saved = log.handlers[:], log.level
    log.handlers[:] = [logging.StreamHandler(sys.stderr)]
    log.setLevel(logging.INFO)
    yield
    log.handlers[:] = saved[0]
    log.setLevel(saved[1])


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root``, relative, with the SHA-256 of a file's bytes ("dir": a dir)."""
    import hashlib

    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            if path.is_file() else "dir" for path in sorted(root.rglob("*"))}


def refusal(case: Bad, tmp_path: Path, capsys) -> str:
    """Run a row; return its one error line once the refusal itself is checked."""
    def expand(text: str) -> str:
        return text.replace(TMP, str(tmp_path))

    if case.setup is not None:
        case.setup(tmp_path)
    before = tree(tmp_path)
    try:
        status = exit_status([expand(arg) for arg in case.argv])
        after = tree(tmp_path)
    finally:
        for path in [tmp_path, *tmp_path.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IRWXU)
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    line = one_error_line(err)
    assert line.startswith("selftrain: error: ")
    assert not [other for other in err.splitlines()  # no parser usage or error besides it
                if other.startswith(("usage:", "error:"))], err[-3000:]
    for name in case.names:
        assert expand(name) in line, line
    changed = sorted(name for name in before if after.get(name) != before[name])
    assert after == before, f"{case.id} wrote {sorted(set(after) - set(before))}, changed {changed}"
    return line


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=case.waits_for)]
                 if case.waits_for else []) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Bad, tmp_path, capsys,
                                                         selftrain_log):
    if case.needs_permissions and not modes_enforced():
        pytest.skip("this process writes into a 0o500 directory (root), so none is unwritable")
    refusal(case, tmp_path, capsys)


def test_the_table_covers_every_subcommand():
    from selftrain.cli import TOOLS, TRAINER_COMMANDS

    assert len(CASES) >= 45
    assert len({case.id for case in CASES}) == len(CASES)
    assert {case.argv[0] for case in CASES} == {*TOOLS, *TRAINER_COMMANDS}


def test_every_row_names_a_flag_or_a_file():
    for case in CASES:
        assert case.names and all(case.names), case.id
        assert any(name.startswith("--") or "." in name or TMP in name or "shard" in name
                   for name in case.names), case.id

