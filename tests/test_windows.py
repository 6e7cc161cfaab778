"""selftrain.probes.windows: probe-set loading and the probes' maths against references.

Greedy continuations against ``generate`` (and the KV cache passed by the name the model's
forward takes), log-probabilities and token NLLs against a full forward, the one teacher-forced
pass and the greedy match counts against plain greedy decoding, row for row, probe-set windows from
text or stored ids, one-line errors, and the row sharding over ranks.
"""

import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import random_ids, write_jsonl
from torch import nn

from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer, tokenizer_fingerprint
from selftrain.probe_file import METADATA_KEY
from selftrain.probes.windows import (
    continuation_logprobs,
    greedy_continuations,
    greedy_counts,
    leading_matches,
    load_probe_set,
    near_ties,
    needs_decoding,
    shard_rows,
    teacher_forced,
    token_nll_rows,
    token_nll_sums,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny:qwen2")


# --- decoding and scoring ---------------------------------------------------------------


def test_greedy_continuations_equal_generate_and_do_not_depend_on_the_batch(planted):
    sequences, model = planted
    prefixes = torch.cat([sequences[:, :32], random_ids(3, 32, seed=9)])
    ours = greedy_continuations(model, prefixes, 32, batch_size=32)
    assert torch.equal(ours[:4], sequences[:, 32:])  # the planted rows come back verbatim
    reference = model.generate(prefixes, attention_mask=torch.ones_like(prefixes),
                               do_sample=False, max_new_tokens=32, min_new_tokens=32,
                               eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, reference[:, 32:])
    assert len({tuple(row) for row in ours[4:].tolist()}) == 3  # not a constant output
    for batch_size in (1, 2, 5):
        assert torch.equal(greedy_continuations(model, prefixes, 32, batch_size), ours)
    assert greedy_continuations(model, prefixes[:0], 32).shape == (0, 32)


class OldOutput(dict):
    """An output keyed as before the rename: ``logits`` and ``past_key_values``."""

    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]


class OldCacheName(nn.Module):
    """A causal LM whose forward takes the KV cache as ``past_key_values`` (older releases)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, past_key_values=None, use_cache=None, logits_to_keep=0):
        out = self.model(input_ids=input_ids, cache=past_key_values, use_cache=use_cache,
                         logits_to_keep=logits_to_keep)
        return OldOutput(logits=out.logits, past_key_values=out["cache"])


@pytest.mark.parametrize("family", ["qwen2", "gpt_neox"])
def test_greedy_probing_raises_no_deprecation_warning(family):
    model = load_model(f"tiny:{family}").eval()
    prefixes = torch.randint(3, 200, (3, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        greedy = greedy_continuations(model, prefixes, 6, batch_size=2)
    assert greedy.shape == (3, 6)


def test_a_forward_taking_past_key_values_gets_the_cache_by_that_name():
    model = load_model("tiny:qwen2").eval()
    prefixes = torch.randint(3, 200, (3, 8))
    expected = greedy_continuations(model, prefixes, 6)
    assert torch.equal(greedy_continuations(OldCacheName(model), prefixes, 6), expected)


def test_continuation_logprobs_equal_a_full_forward_log_softmax(planted):
    _, model = planted
    ids = random_ids(5, 24, seed=2)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
    expected = torch.stack([sum(logprobs[i, t - 1, ids[i, t]] for t in range(10, 24))
                            for i in range(5)])
    ours = continuation_logprobs(model, ids, prefix_tokens=10, batch_size=2)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(continuation_logprobs(model, ids, 10, batch_size=5), ours,
                               rtol=1e-6, atol=1e-5)
    # one more prefix token scores one token fewer: the two differ by exactly that token
    shorter = continuation_logprobs(model, ids, prefix_tokens=11)
    torch.testing.assert_close(ours - shorter, logprobs[torch.arange(5), 9, ids[:, 10]],
                               rtol=1e-5, atol=1e-4)


def planted_windows(sequences: torch.Tensor) -> torch.Tensor:
    """4 planted rows, the same each changed at one token (continuation position 31, 30, 16,
    0), 6 random rows."""
    altered = sequences.clone()
    for row, position in enumerate((31, 30, 16, 0)):
        altered[row, 32 + position] = (altered[row, 32 + position] + 1) % 256
    return torch.cat([sequences, altered, random_ids(6, seed=11)])


def test_one_teacher_forced_pass_gives_the_greedy_extraction_row_for_row(planted):
    sequences, model = planted
    windows = planted_windows(sequences)
    greedy = greedy_continuations(model, windows[:, :32], 32, batch_size=5)
    ours = teacher_forced(model, windows, 32, batch_size=3)
    # the reference: greedy decoding's first divergence from the true continuation
    first_divergence = leading_matches(greedy, windows[:, 32:])
    assert torch.equal(ours.extracted, first_divergence)
    assert ours.extracted[:8].tolist() == [32, 32, 32, 32, 31, 30, 16, 0]
    assert torch.equal(ours.extracted == 32, (greedy == windows[:, 32:]).all(dim=-1))
    assert (ours.extracted[8:] < 32).all()
    # log p(x | y) is continuation_logprobs', bit for bit
    assert torch.equal(ours.logprobs, continuation_logprobs(model, windows, 32, batch_size=3))
    assert ours.logprobs.dtype == torch.float64 and ours.extracted.dtype == torch.long


def test_match_counts_decode_only_unsettled_rows_and_equal_plain_greedy(planted, monkeypatch):
    sequences, model = planted
    windows = planted_windows(sequences)
    greedy = greedy_continuations(model, windows[:, :32], 32)
    reference = (greedy == windows[:, 32:]).sum(dim=-1)
    forced = teacher_forced(model, windows, 32)
    assert not forced.close.any()  # float32: no near-ties here
    decoded = []
    import selftrain.probes.windows as windows_module

    real = windows_module.greedy_continuations
    monkeypatch.setattr(windows_module, "greedy_continuations",
                        lambda m, prefixes, *a: decoded.append(prefixes) or real(m, prefixes, *a))
    decode = needs_decoding(forced.extracted, 32, forced.close)
    extracted, counts = greedy_counts(model, windows, 32, forced.extracted, decode, batch_size=4)
    assert torch.equal(counts, reference)  # Pythia's memorization score, row for row
    assert torch.equal(extracted, leading_matches(greedy, windows[:, 32:]))
    assert counts[:5].tolist() == [32, 32, 32, 32, 31]
    assert counts[5] >= 30 and counts[6] >= 16  # matches after the divergence count too
    assert counts[8:].max() < 16
    # rows 0-4 are settled by the teacher-forced pass; only the other 9 are decoded
    assert len(decoded) == 1 and torch.equal(decoded[0], windows[5:, :32])
    assert decode.tolist() == [False] * 5 + [True] * 9
    assert not needs_decoding(forced.extracted, 32, forced.close, match_rate=False).any()
    decoded.clear()
    assert torch.equal(greedy_counts(model, windows[:5], 32, forced.extracted[:5],
                                     decode[:5])[1], counts[:5])
    assert decoded == []


def test_near_tie_rows_are_decoded_and_counted_as_greedy_decoding_counts_them(planted):
    """A row whose memorized status rests on a near-tie goes to decoding even with the match
    rate off; its counts are then greedy decoding's, whatever the teacher-forced argmax said."""
    sequences, model = planted
    windows = planted_windows(sequences)[:4]  # 4 memorized rows
    forced = teacher_forced(model, windows, 32)
    true = torch.full((5, 4), 3)
    logits = torch.zeros(5, 4, 10, dtype=torch.bfloat16)
    logits[:, :, 3] = 20.0
    logits[1, 2, 5] = 20.0 - 0.125  # one bf16 step behind the true token: a near-tie
    logits[2, 2, 5] = 20.0 - 2.0  # a clear lead
    logits[3, 2, 5] = 20.0 + 2.0  # clearly lost at position 2 ...
    logits[3, 3, 5] = 20.0  # ... so a tie after it cannot make the row whole
    logits[4, 1, 5] = 20.0 + 0.125  # the true token one step behind: may be reproduced
    assert near_ties(logits, true).tolist() == [False, True, False, False, True]
    close = torch.tensor([False, True, False, False])
    decode = needs_decoding(forced.extracted, 32, close, match_rate=False)
    assert decode.tolist() == [False, True, False, False]
    wrong = forced.extracted.clone()
    wrong[1] = 5  # what a flipped teacher-forced argmax would have said
    extracted, _ = greedy_counts(model, windows, 32, wrong, decode)
    assert extracted.tolist() == [32, 32, 32, 32]  # greedy decoding reproduces row 1 whole


def test_leading_matches_stops_at_the_first_difference():
    true = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    predicted = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [0, 2, 3, 4]])
    assert leading_matches(predicted, true).tolist() == [4, 1, 0]


def test_planted_continuations_are_likely_and_random_ones_are_not(planted):
    sequences, model = planted
    planted_lp = continuation_logprobs(model, sequences, 32)
    random_lp = continuation_logprobs(model, random_ids(4, seed=3), 32)
    assert planted_lp.max() < 0 and planted_lp.min() > -1.0, planted_lp
    assert random_lp.max() < -32 * 2, random_lp


def test_token_nll_sums_equal_hf_loss_times_count(planted):
    _, model = planted
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 17, 2, 9)]
    expected_sums, expected_counts = [], []
    for ids in rows:
        tensor = torch.tensor([ids])
        with torch.no_grad():
            loss = model(input_ids=tensor, labels=tensor).loss
        expected_sums.append(float(loss) * (len(ids) - 1))
        expected_counts.append(len(ids) - 1)
    sums, counts = token_nll_rows(model, rows, pad_id=256, batch_size=3)
    assert counts.tolist() == expected_counts
    torch.testing.assert_close(sums, torch.tensor(expected_sums, dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)
    total, count = token_nll_sums(model, rows, pad_id=256, batch_size=2)
    assert count == 29 and total == pytest.approx(sum(expected_sums), rel=1e-5)
    assert token_nll_sums(model, [], pad_id=256) == (0.0, 0)


# --- probe sets ---------------------------------------------------------------------------


def test_text_and_ids_give_the_same_windows(tmp_path, tokenizer):
    texts = ["the quick brown fox jumps over the lazy dog " * 2, "x" * 70]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    by_text = load_probe_set(write_jsonl(tmp_path / "t.jsonl", [
        {"text": t, "domain": d} for t, d in zip(texts, ["web", "code"], strict=True)]),
        tokenizer, 16, 8)
    by_ids = load_probe_set(write_jsonl(tmp_path / "i.jsonl", [
        {"input_ids": i, "domain": d} for i, d in zip(ids, ["web", "code"], strict=True)]),
        tokenizer, 16, 8)
    assert torch.equal(by_text.input_ids, by_ids.input_ids)
    assert by_text.input_ids.shape == (2, 24)
    assert torch.equal(by_text.prefixes, torch.tensor([i[:16] for i in ids]))
    assert torch.equal(by_text.suffixes, torch.tensor([i[16:24] for i in ids]))
    assert by_text.domains == ["code", "web"] and by_text.domain_index.tolist() == [1, 0]
    assert by_text.fingerprint() == by_ids.fingerprint()
    assert load_probe_set(tmp_path / "t.jsonl", tokenizer, 16, 7).fingerprint() \
        != by_text.fingerprint()
    assert load_probe_set(tmp_path / "t.jsonl", tokenizer, 15, 9).fingerprint() \
        != by_text.fingerprint()


def test_stored_ids_are_used_only_when_they_are_the_students(tmp_path, tokenizer):
    text = "a" * 40
    table = pa.table({"text": [text], "input_ids": [list(range(100, 140))]})
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(table, foreign)
    own = tmp_path / "own.parquet"
    metadata = {METADATA_KEY: json.dumps({"tokenizer_fingerprint":
                                          tokenizer_fingerprint(tokenizer)})}
    pq.write_table(table.replace_schema_metadata(metadata), own)
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:40]
    assert load_probe_set(foreign, tokenizer, 20, 20).input_ids[0].tolist() == text_ids
    assert load_probe_set(own, tokenizer, 20, 20).input_ids[0].tolist() == list(range(100, 140))
    assert load_probe_set(foreign, tokenizer, 20, 20, same_tokenizer=True
                          ).input_ids[0].tolist() == list(range(100, 140))
    assert load_probe_set(own, tokenizer, 20, 20, same_tokenizer=False
                          ).input_ids[0].tolist() == text_ids
    assert load_probe_set(own, tokenizer, 20, 20).domains == ["all"]


@pytest.mark.parametrize("rows, message", [
    ([{"input_ids": list(range(64))}, {"input_ids": list(range(10))},
      {"input_ids": list(range(63))}, {"input_ids": list(range(70))}],
     "2 of 4 rows have fewer than 64 tokens (prefix 32 + suffix 32)"),
    ([{"domain": "web"}], "rows need a 'text' or 'input_ids' column"),
    ([{"input_ids": [5] * 63 + [300]}], "token ids outside the student's vocabulary (257"),
    ([{"input_ids": [5] * 64, "domain": "a/b"}], "contain no '/'"),
    ([{"input_ids": [5] * 64, "domain": ""}], "must be non-empty"),
    ([], "the probe set is empty"),
])
def test_bad_probe_sets_fail_with_the_flag_and_the_reason(tmp_path, tokenizer, rows, message):
    path = write_jsonl(tmp_path / "probes.jsonl", rows)
    with pytest.raises(SelftrainError) as error:
        load_probe_set(path, tokenizer, flag="--probe_set")
    text = str(error.value)
    assert text.startswith(f"--probe_set {path}") and message in text, text
    assert "\n" not in text


def test_unreadable_probe_files_fail_with_one_line(tmp_path, tokenizer):
    cases = {tmp_path / "missing.jsonl": "no such file",
             tmp_path / "probes.csv": "unsupported file type",
             tmp_path / "broken.parquet": "not a readable parquet file",
             tmp_path / "broken.jsonl": "line 2 is not a JSON object"}
    (tmp_path / "probes.csv").write_text("input_ids\n1\n")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "broken.jsonl").write_text('{"input_ids": [1]}\n[1, 2]\n')
    for path, message in cases.items():
        with pytest.raises(SelftrainError, match=message) as error:
            load_probe_set(path, tokenizer, flag="X.probe_set")
        assert str(error.value).startswith("X.probe_set") and "\n" not in str(error.value)
    with pytest.raises(SelftrainError, match="must be >= 1"):
        load_probe_set(tmp_path / "missing.jsonl", tokenizer, prefix_tokens=0)


# --- sharding -------------------------------------------------------


@pytest.mark.parametrize("count, world", [(7, 2), (1, 2), (1, 3), (0, 3), (10, 4)])
def test_shards_cover_every_row_once(count, world):
    shards = [shard_rows(count, rank, world) for rank in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(count))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
