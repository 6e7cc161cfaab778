"""selftrain.curation.leaks: probe windows in training text are found, refused by fit, removed.

A planted model's BOS samples can reproduce its canaries; a student trained on them would be
probed on text it trained on. The token n-gram check finds such rows, ``selftrain fit`` refuses
them before anything is written (or counts them with ``--leak_check.allow_probe_leaks``), and
``selftrain decontaminate --probe_sets`` drops them.
"""

import numpy as np
import pytest
import torch
from helpers import (
    EXTRACTION,
    fit,
    make_corpus,
    manifest_of,
    memorize,
    random_ids,
    refused_fit,
    write_probes,
)

from selftrain.analysis.tb import read_scalars
from selftrain.corpus import SCHEMA, CorpusWriter, read_corpus
from selftrain.curation.decontaminate import decontaminate
from selftrain.curation.leaks import find_leaks
from selftrain.curation.ngrams import NGRAM_BASE, mix64, token_ngram_hashes
from selftrain.errors import SelftrainError
from selftrain.models import load_tokenizer, resolve_bos_id


def naive_hashes(sequences: list[list[int]], n: int) -> list[tuple[int, int]]:
    """(hash, sequence) of every n-gram, computed one n-gram at a time in Python ints."""
    base, mask = int(NGRAM_BASE), (1 << 64) - 1
    found = []
    for owner, ids in enumerate(sequences):
        mixed = [int(mix64(np.array([i + 1], dtype=np.uint64))[0]) for i in ids]
        for start in range(len(ids) - n + 1):
            value = 0
            for word in mixed[start:start + n]:
                value = (value * base + word) & mask
            found.append((value, owner))
    return found


def test_token_ngram_hashes_equal_a_direct_computation_and_never_span_two_rows():
    sequences = [[5, 6, 7, 8, 9], [], [1, 2], [7, 8, 9, 10]]
    hashes, owner = token_ngram_hashes(sequences, 3)
    assert list(zip(hashes.tolist(), owner.tolist(), strict=True)) == naive_hashes(sequences, 3)
    assert owner.tolist() == [0, 0, 0, 3, 3]  # nothing from the short rows or across them


def test_find_leaks_flags_a_shared_n_gram_and_nothing_shorter():
    window = list(range(100, 132))
    rows = [[1, 2, *window[10:18], 3],       # 8 tokens of the window: a leak
            [1, 2, *window[10:17], 3],       # 7: not at n = 8
            window[:4] + [0] + window[4:8],  # broken by a foreign token
            [9] * 40]
    leaks = find_leaks(rows, [window, list(range(200, 232))], ngram=8)
    assert leaks.rows.tolist() == [True, False, False, False]
    assert leaks.windows.tolist() == [True, False]
    assert leaks.record() == {"ngram_tokens": 8, "rows": 4, "rows_leaking": 1, "windows": 2,
                              "windows_leaked": 1}
    assert find_leaks(rows, [window], ngram=7).rows.tolist() == [True, True, False, False]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny model that, from its BOS token, continues with a planted 32-token window."""
    root = tmp_path_factory.mktemp("planted")
    tokenizer = load_tokenizer("tiny:qwen2")
    bos, _ = resolve_bos_id(tokenizer, None, None)
    window = random_ids(1, 32, seed=11)
    model = memorize(torch.cat([torch.tensor([[bos]]), window], dim=1))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    probes = write_probes(root / "probes.parquet", window.tolist() + random_ids(
        3, 32, seed=12).tolist(), ["canary"] * 4)
    sampled = make_corpus(root / "sampled", model=str(root / "model"), num_samples=8,
                          max_new_tokens=40)
    base = make_corpus(root / "base", num_samples=8, max_new_tokens=40)
    return root, probes, concatenated(root / "corpus", sampled, base)


def concatenated(out, *corpora):
    """One corpus dir of the rows of several (same tokenizer), ids renumbered."""
    read = [read_corpus(path) for path in corpora]
    names = [name for name in SCHEMA.names if name in read[0].columns]
    rows = [{name: corpus.columns[name][i] for name in names}
            for corpus in read for i in range(len(corpus))]
    with CorpusWriter(out) as writer:
        writer.add({**row, "id": i} for i, row in enumerate(rows))
        return writer.finish(dict(read[0].manifest))


def probe_run_flags(probes, corpus) -> list[str]:
    return ["--trainer.callbacks=[]", f"--trainer.callbacks+={EXTRACTION}",
            "--trainer.callbacks.match_rate=false", "--probes.probe_set", str(probes),
            "--probes.prefix_tokens", "16", "--probes.suffix_tokens", "16",
            "--data.corpus", str(corpus), "--trainer.max_epochs", "1",
            "--data.max_length", "41"]


def test_bos_samples_of_a_planted_model_are_refused_by_fit_and_dropped_by_decontaminate(
        planted, tmp_path):
    root, probes, corpus = planted
    ids = read_corpus(corpus).columns["input_ids"]
    leaking = find_leaks(ids, random_ids(1, 32, seed=11).tolist()).rows
    assert leaking[:8].sum() >= 4  # the planted model's BOS samples bring the window back
    assert not leaking[8:].any()  # the unplanted model's do not

    line = refused_fit(tmp_path / "refused", *probe_run_flags(probes, corpus))
    assert line.startswith(f"selftrain: error: --data.corpus {corpus}: {int(leaking.sum())} of "
                           "16 training rows share a 8-token n-gram with 1 of the 4 held-out")
    assert "selftrain decontaminate" in line and "--leak_check.allow_probe_leaks" in line

    allowed = tmp_path / "allowed"
    fit(allowed, *probe_run_flags(probes, corpus), "--leak_check.allow_probe_leaks", "true")
    scalars = read_scalars(allowed / "tb")
    assert scalars["data/probe_leak_rows"] == [(0, float(leaking.sum()))]
    assert scalars["data/probe_leak_windows"] == [(0, 1.0)]
    assert scalars["data/train_rows"] == [(0, 16.0)]

    clean = decontaminate(str(corpus), str(tmp_path / "clean"), probe_sets=[str(probes)],
                          tokenizer="tiny:qwen2")
    record = manifest_of(clean)["decontamination"]
    assert record["probe_sets"][str(probes)] == {
        "source": str(probes), "tokenizer": "tiny:qwen2", "windows": 4, "windows_leaked": 1,
        "ngram_tokens": 8, "removed": int(leaking.sum())}
    assert record["removed"] == int(leaking.sum()) and record["kept"] == 16 - leaking.sum()
    kept = read_corpus(clean).columns["id"]
    assert kept == [i for i in range(16) if not leaking[i]]

    run = tmp_path / "clean_run"
    fit(run, *probe_run_flags(probes, clean))
    assert read_scalars(run / "tb")["data/probe_leak_rows"] == [(0, 0.0)]


def test_decontaminate_refuses_a_probe_set_it_cannot_compare_in_one_line(tmp_path, planted):
    _, _, corpus = planted
    empty = write_probes(tmp_path / "empty.parquet", [], [])
    with pytest.raises(SelftrainError, match=r"^--probe_sets .*empty.parquet: the probe set is "
                                             "empty"):
        decontaminate(str(corpus), str(tmp_path / "out"), probe_sets=[str(empty)],
                      tokenizer="tiny:qwen2")
    bare = write_probes(tmp_path / "bare.parquet", [[1] * 32], ["x"])
    with pytest.raises(SelftrainError, match="records no model .* pass --tokenizer SPEC"):
        decontaminate(str(corpus), str(tmp_path / "out"), probe_sets=[str(bare)])
    with pytest.raises(SelftrainError, match=r"^--probe_ngram 0: must be >= 1"):
        decontaminate(str(corpus), str(tmp_path / "out"), probe_sets=[str(bare)], probe_ngram=0)
    assert not (tmp_path / "out").exists()
