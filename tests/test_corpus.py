"""selftrain.corpus: the manifest stamp, the atomic writer, and rows read back checked."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import manifest_of

from selftrain.corpus import CorpusWriter, read_corpus, stamp
from selftrain.errors import SelftrainError

ROW = {"id": 0, "text": "a", "input_ids": [1, 2], "num_tokens": 2, "finished": True,
       "subset": 0, "source": "test"}


def test_stamp_puts_format_version_and_time_first():
    stamped = stamp({"kind": "synthetic", "seed": 3})
    assert list(stamped) == ["format", "tool_version", "created", "kind", "seed"]
    assert stamped["format"] == "selftrain-corpus/1" and stamped["seed"] == 3


def test_writer_replaces_a_corpus_only_once_the_new_one_is_complete(tmp_path):
    out = tmp_path / "corpus"
    with CorpusWriter(out) as writer:
        writer.add([ROW])
        writer.finish({"seed": 1})
    with pytest.raises(SelftrainError, match="--overwrite"), CorpusWriter(out):
        pass
    with pytest.raises(RuntimeError), CorpusWriter(out, overwrite=True) as writer:
        writer.add([{**ROW, "text": "b"}] * 3)
        raise RuntimeError("killed before finish")
    assert read_corpus(out).columns["text"] == ["a"] and manifest_of(out)["seed"] == 1
    with CorpusWriter(out, shard_size=2, overwrite=True) as writer:
        writer.add([{**ROW, "id": i, "text": "b"} for i in range(3)])
        writer.finish({"seed": 2})
    manifest = manifest_of(out)
    assert read_corpus(out).columns["text"] == ["b"] * 3
    assert (manifest["seed"], manifest["counts"]["written"]) == (2, 3)
    assert len(list((out / "data").glob("*.parquet"))) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]  # no staging or old copy left


def test_negative_ids_in_a_parquet_corpus_are_refused(tmp_path):
    pq.write_table(pa.table({"input_ids": pa.array([[5, 6], [7, -2]], pa.list_(pa.int32()))}),
                   tmp_path / "c.parquet")
    with pytest.raises(SelftrainError, match=r"row 2 has input_ids \[7, -2\]"):
        read_corpus(tmp_path / "c.parquet")
