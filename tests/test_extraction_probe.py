"""selftrain.callbacks.extraction_probe: ExtractionProbe counts the rows the student reproduces.

On a model with planted memories (memorized rows extracted, random rows not, a row file per
evaluation; the one-pass counts equal plain greedy decoding's row for row; the match rate
switched off decodes nothing), and a probe set too short for its window refused before training.
"""

import pyarrow.parquet as pq
import pytest
import torch
from helpers import EXTRACTION, bare_trainer, make_student, refused_fit, write_jsonl

import selftrain.probes.windows as windows_module
from selftrain.callbacks.extraction_probe import ExtractionProbe
from selftrain.probes.windows import greedy_continuations


def test_memorized_rows_are_extracted_and_random_rows_are_not(tmp_path, planted_probes):
    path, model = planted_probes
    trainer, module = bare_trainer(tmp_path), make_student(model).eval()
    probe = ExtractionProbe(probe_set=str(path), batch_size=3)
    probe.check(trainer, module)
    with torch.no_grad():
        metrics = probe.evaluate(trainer, module, epoch=0, step=0)
    assert metrics["extraction/planted/memorized"] == 4
    assert metrics["extraction/planted/match_rate"] == pytest.approx((4 * 32 + 31) / (5 * 32))
    assert metrics["extraction/random/memorized"] == 0
    assert metrics["extraction/memorized"] == 4

    rows = pq.read_table(tmp_path / "eval" / "extraction" / "epoch=0-step=0.parquet").to_pydict()
    assert rows["row"] == list(range(9))
    assert rows["domain"] == ["planted"] * 5 + ["random"] * 4
    assert rows["matched_tokens"][:5] == [32, 32, 32, 32, 31]
    assert rows["extracted_tokens"][:5] == [32, 32, 32, 32, 31]
    assert rows["memorized"] == [True] * 4 + [False] * 5
    random_rate = sum(rows["matched_tokens"][5:]) / (4 * 32)
    assert 0 <= random_rate < 0.5
    assert metrics["extraction/random/match_rate"] == pytest.approx(random_rate)
    assert metrics["extraction/match_rate"] == pytest.approx(sum(rows["matched_tokens"]) / 288)
    assert not [p for p in (tmp_path / "eval" / "extraction").iterdir()
                if p.name.startswith(".")]


def test_a_bad_probe_set_fails_before_training_with_one_line(tmp_path):
    short = tmp_path / "short.jsonl"
    write_jsonl(short, ({"input_ids": list(range(n))} for n in (64, 12, 30)))
    assert refused_fit(tmp_path / "run", f"--trainer.callbacks+={EXTRACTION}",
                       f"--trainer.callbacks.probe_set={short}", callbacks=False) == (
        f"selftrain: error: ExtractionProbe.probe_set {short}: 2 of 3 rows have fewer than 64 "
        "tokens (prefix 32 + suffix 32) under the student's tokenizer; drop those rows or "
        "lower the prefix/suffix lengths")


def test_one_pass_counts_equal_plain_greedy_decoding_row_for_row(tmp_path, planted_probes,
                                                                 monkeypatch):
    path, model = planted_probes
    trainer, module = bare_trainer(tmp_path), make_student(model).eval()
    probe = ExtractionProbe(probe_set=str(path), batch_size=4)
    probe.check(trainer, module)
    probes = probe.probes
    # the old definition: greedy-decode every row, count equal tokens position by position
    greedy = greedy_continuations(model, probes.prefixes, 32)
    reference = (greedy == probes.suffixes).sum(dim=-1)
    decoded = []
    real = windows_module.greedy_continuations
    monkeypatch.setattr(windows_module, "greedy_continuations",
                        lambda m, prefixes, *a: decoded.append(len(prefixes)) or real(
                            m, prefixes, *a))
    with torch.no_grad():
        metrics = probe.evaluate(trainer, module, epoch=0, step=0)
    rows = pq.read_table(tmp_path / "eval" / "extraction" / "epoch=0-step=0.parquet").to_pydict()
    assert rows["matched_tokens"] == reference.tolist()
    assert rows["memorized"] == (reference == 32).tolist()
    assert decoded == [4]  # the 4 random rows; the planted ones are settled without decoding
    for i, domain in enumerate(probes.domains):
        mine = probes.domain_index == i
        assert metrics[f"extraction/{domain}/memorized"] == int((reference[mine] == 32).sum())
        assert metrics[f"extraction/{domain}/match_rate"] == pytest.approx(
            float(reference[mine].double().mean() / 32), abs=1e-12)

    # match_rate off: the memorized counts alone, and nothing decoded
    decoded.clear()
    quick = ExtractionProbe(probe_set=str(path), match_rate=False)
    quick.check(trainer, module)
    with torch.no_grad():
        only = quick.evaluate(trainer, module, epoch=1, step=0)
    assert decoded == []
    assert only == {key: value for key, value in metrics.items() if "match_rate" not in key}
    rows = pq.read_table(tmp_path / "eval" / "extraction" / "epoch=1-step=0.parquet").to_pydict()
    assert rows["matched_tokens"] == [None] * 9
    assert rows["memorized"] == (reference == 32).tolist()
