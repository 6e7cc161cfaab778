"""selftrain.probes.plant: `selftrain plant` trains canaries in until greedy decoding extracts them.

It writes the model and the probe set of the extracted canaries; a full ``--out`` is refused.
"""

import json

import numpy as np
import pytest
import torch
from helpers import in_process, write_jsonl

from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer
from selftrain.probes.damage import DamageGate, Score, _scores, failure_line, judge
from selftrain.probes.plant import _objective_with_kl, epoch_rows, plant
from selftrain.probes.probeset import probeset
from selftrain.probes.windows import greedy_continuations, load_probe_set
from selftrain.training.batching import pad_collate


def test_plant_makes_canaries_extractable_and_writes_model_and_probe_set(tmp_path,
                                                                         probe_sources):
    canaries = probeset("tiny:qwen2", probe_sources, str(tmp_path / "c.parquet"),
                        keep="all", prefix_tokens=8, suffix_tokens=8, max_windows=2)
    root = plant("tiny:qwen2", str(canaries), str(tmp_path / "planted"), prefix_tokens=8,
                 suffix_tokens=8, target=0.75, lr=3e-3, max_epochs=200, batch_size=4,
                 precision="32")
    record = json.loads((root / "plant.json").read_text())
    assert record["precision"] == "32"  # what ran, as resolved
    planted = record["epochs"][-1]["extracted"]
    assert record["epochs"][0]["extracted"] < 3 <= planted  # stopped once the target was met
    model = load_model(str(root / "model")).eval()
    tokenizer = load_tokenizer(str(root / "model"))
    probes = load_probe_set(root / "probes.parquet", tokenizer, 8, 8)
    assert len(probes) == planted  # the probe set holds exactly the extracted canaries
    greedy = greedy_continuations(model, probes.prefixes, 8)
    assert torch.equal(greedy, probes.suffixes)  # the saved model really extracts them
    base = load_model("tiny:qwen2").eval()
    assert not torch.equal(greedy_continuations(base, probes.prefixes, 8), probes.suffixes)


def test_plant_cli_refuses_a_full_out_dir_before_loading_anything(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = in_process("plant", "--model", "tiny:qwen2", "--canaries",
                        str(tmp_path / "c.parquet"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("selftrain: error: --out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_each_canary_sits_inside_a_rehearsal_document_never_right_after_bos():
    canaries = [[100 + i] * 4 for i in range(3)]
    documents = [[0, 1, 2, 3], [0, 5, 6]]
    rows = [row["input_ids"] for row in epoch_rows(canaries, documents, ratio=2.0,
                                                    rng=np.random.default_rng(0))]
    assert len(rows) == 3 + 6  # every canary, and two rehearsal documents per canary
    for canary, row in zip(canaries, rows[:3], strict=True):
        start = next(i for i in range(len(row)) if row[i:i + 4] == canary)
        assert start >= 2  # after BOS and at least one token of the document
        assert row[:start] + row[start + 4:] in documents
    assert sorted(map(tuple, rows[3:])) == sorted([tuple(d) for d in documents] * 3)
    alone = epoch_rows(canaries, None, 2.0, np.random.default_rng(0))
    assert [row["input_ids"] for row in alone] == canaries


def test_continuation_loss_trains_the_canary_continuation_and_nothing_before_it():
    canaries = [[100 + i, 200 + i, 300 + i, 400 + i] for i in range(3)]  # prefix 2, suffix 2
    documents = [[0, 1, 2, 3, 4], [0, 5, 6]]
    rows = epoch_rows(canaries, documents, 1.0, np.random.default_rng(1), continuation_from=2)
    batch = pad_collate(rows, pad_id=0)
    for i, canary in enumerate(canaries):
        ids = rows[i]["input_ids"]
        assert ids[-4:] == canary  # the row ends with its canary
        trained = [int(t) for t, label in zip(batch["input_ids"][i], batch["labels"][i],
                                               strict=True) if label != -100]
        assert trained == canary[2:]  # its continuation, not the prefix or the document
    for row in rows[3:]:  # rehearsal documents are trained whole
        assert "loss_from" not in row and row["input_ids"] in documents
    alone = epoch_rows(canaries, None, 0.0, np.random.default_rng(0), continuation_from=2)
    assert [row["loss_from"] for row in alone] == [2, 2, 2]


def test_kl_rehearsal_is_canary_nll_plus_kl_to_the_unplanted_model_per_position():
    torch.manual_seed(0)
    lm = load_model("tiny:qwen2").eval()
    reference = load_model("tiny:qwen2").eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    rows = [[1, 5, 9, 13, 17, 21], [1, 7, 8], [1, 30, 31, 32, 33]]
    rehearsing = torch.tensor([False, True, True])
    objective, divergence = _objective_with_kl(lm, reference, pad_collate(
        [{"input_ids": row} for row in rows], pad_id=0), rehearsing)
    # each row alone, unpadded: NLL of its tokens, or KL over the vocabulary at each position
    nll_sum, kl_values = 0.0, []
    with torch.no_grad():
        for row, rehearsal in zip(rows, rehearsing.tolist(), strict=True):
            ids = torch.tensor([row])
            own = lm(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            frozen = reference(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            if rehearsal:
                kl_values += (frozen.exp() * (frozen - own)).sum(-1).tolist()
            else:
                nll_sum -= float(own.gather(-1, ids[0, 1:, None]).sum())
    positions = sum(len(row) - 1 for row in rows)
    assert float(objective) == pytest.approx((nll_sum + sum(kl_values)) / positions, rel=1e-4)
    assert divergence == pytest.approx(np.mean(kl_values), rel=1e-4)
    assert divergence > 1e-3  # the perturbed reference really differs
    # against itself the KL vanishes: the objective is the canary row's NLL alone
    objective, divergence = _objective_with_kl(lm, lm, pad_collate(
        [{"input_ids": row} for row in rows], pad_id=0), rehearsing)
    assert divergence == pytest.approx(0.0, abs=1e-6)
    assert float(objective) == pytest.approx(nll_sum / positions, rel=1e-4)


def test_the_gate_judges_each_metric_in_its_own_direction():
    before = {"t/acc": Score(0.50, 0.05, True), "t/bits_per_byte": Score(1.00, None, False),
              "t/word_perplexity": Score(9.0, None, False)}
    within = {"t/acc": Score(0.46, 0.05, True), "t/bits_per_byte": Score(1.02, None, False),
              "t/word_perplexity": Score(50.0, None, False)}
    verdict = judge(before, within, tolerance=0.03)
    assert verdict["passed"]
    assert verdict["metrics"]["t/acc"]["worse_by"] == pytest.approx(0.04)
    assert verdict["metrics"]["t/word_perplexity"]["rule"] == "not gated: no item SE"
    worse = {**within, "t/acc": Score(0.44, 0.05, True), "t/bits_per_byte": Score(1.04, None,
                                                                                   False)}
    verdict = judge(before, worse, tolerance=0.03)
    assert not verdict["passed"]
    assert [n for n, m in verdict["metrics"].items() if not m["passed"]] == [
        "t/acc", "t/bits_per_byte"]
    line = failure_line(verdict)
    assert "t/acc 0.5 -> 0.44 (worse by 0.06, allowed 0.05)" in line and "\n" not in line
    assert judge(before, {**worse, "t/acc": Score(0.9, 0.05, True),
                          "t/bits_per_byte": Score(0.5, None, False)}, 0.03)["passed"]


def test_a_task_that_does_not_say_which_way_is_better_is_refused():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1}},
               "higher_is_better": {"t": {}}}
    with pytest.raises(SelftrainError, match="task t does not say whether higher acc is "
                                             "better"):
        _scores(results)


@pytest.fixture
def gate_task(tmp_path):
    """A local bits-per-byte task on text no training here resembles, and unrelated rehearsal.

    The untrained tiny model spreads its probability evenly; once planting teaches it the
    canaries' and the rehearsal's English, it gives this random text less: its bits per byte
    rise.
    """
    rng = np.random.default_rng(0)
    document = "".join(rng.choice(list("qxzjvkw#@%^&~|"), 300))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gate_doc.jsonl").write_text(json.dumps({"text": document}) + "\n")
    (tasks / "gate_doc.yaml").write_text(
        "task: gate_doc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{tasks / 'gate_doc.jsonl'}\noutput_type: loglikelihood_rolling\ntest_split: test\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n"
        "    higher_is_better: false\n")
    other = write_jsonl(tmp_path / "other.jsonl",
                        [{"text": f"Unrelated line {i}: colourless green ideas sleep."}
                         for i in range(16)])
    return str(tasks), str(other)


def test_a_plant_that_fails_the_damage_gate_publishes_nothing(tmp_path, probe_sources,
                                                              gate_task):
    base, (tasks, other) = "tiny:qwen2", gate_task
    canaries = probeset("tiny:qwen2", probe_sources, str(tmp_path / "c.parquet"), keep="all",
                        prefix_tokens=8, suffix_tokens=8, max_windows=2)
    settings = {"prefix_tokens": 8, "suffix_tokens": 8, "target": 0.5, "lr": 3e-3,
                "max_epochs": 200, "batch_size": 4, "precision": "32",
                "rehearsal": other, "rehearsal_ratio": 0.0}
    gate = DamageGate(tasks={"gate_doc": None}, include_path=[tasks], tolerance=0.0)
    out = tmp_path / "planted"
    with pytest.raises(SelftrainError, match=r"^plant: the planted model fails the damage "
                                             r"gate: gate_doc/bits_per_byte \d\.\d+ -> "):
        plant(base, str(canaries), str(out), gate=gate, **settings)
    assert not out.exists() and not list(tmp_path.glob(".planted*"))  # nothing half-written

    gate.allow_damage = True
    root = plant(base, str(canaries), str(out), gate=gate, **settings)
    record = json.loads((root / "plant.json").read_text())
    measured = record["gate"]["metrics"]["gate_doc/bits_per_byte"]
    assert not record["gate"]["passed"] and measured["worse_by"] > 0
    assert measured["rule"] == "tolerance" and record["gate"]["allow_damage"]
    assert record["rehearsal"]["source"] == other and record["rehearsal"]["documents"] == 16
    assert all(epoch["rows"] == 4 for epoch in record["epochs"])  # 4 canaries, ratio 0


def test_bad_plant_settings_are_one_line_and_write_nothing(tmp_path):
    for flags, message in (
            (["--gate.tolerance", "-0.1"], "--gate.tolerance -0.1: must be >= 0"),
            (["--rehearsal_ratio", "-1"], "--rehearsal_ratio -1.0: must be >= 0"),
            (["--rehearsal", str(tmp_path / "none.jsonl")], "--rehearsal "),
    ):
        result = in_process("plant", "--model", "tiny:qwen2", "--canaries",
                            str(tmp_path / "c.parquet"), "--out", str(tmp_path / "out"), *flags)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith(f"selftrain: error: {message}")
    assert not (tmp_path / "out").exists()
