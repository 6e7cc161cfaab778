"""Digests saved with checkpoints and exports: a file that lost bits is refused, an intact one
reads, and a save killed between its two renames leaves a file its sidecar still accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selftrain.digests import (
    DIGESTS_FILE,
    file_digest,
    save_with_digest,
    sidecar,
    verify,
    write_dir_digests,
)
from selftrain.errors import SelftrainError


def save(path: Path, value: float) -> None:
    save_with_digest(path, lambda staging: torch.save({"w": torch.full((256,), value)}, staging))


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_saved_file_verifies_and_one_flipped_byte_is_refused(tmp_path):
    path = tmp_path / "last.ckpt"
    save(path, 1.0)
    assert verify(path, "--ckpt_path")
    flip(path, path.stat().st_size // 2)
    with pytest.raises(SelftrainError, match=r"--ckpt_path .*last\.ckpt: does not match the "
                                              r"digest saved beside it \(last\.ckpt\.digest"):
        verify(path, "--ckpt_path")


def test_a_file_without_a_sidecar_is_not_verified_and_not_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"w": 1}, path)
    assert verify(path, "--ckpt_path") is False


def test_a_save_that_fails_leaves_the_old_file_and_its_digest(tmp_path):
    path = tmp_path / "last.ckpt"
    save(path, 1.0)
    old = file_digest(path)
    save(path, 2.0)  # the complete save: the sidecar accepts the new bytes alone
    assert json.loads(sidecar(path).read_text())["accepted"] == [file_digest(path)]
    assert file_digest(path) != old

    class Killed(Exception):
        pass

    def killed_after_the_sidecar(staging: Path) -> None:  # dies half-way through its write
        torch.save({"w": torch.full((256,), 3.0)}, staging)
        raise Killed

    before = file_digest(path)
    with pytest.raises(Killed):
        save_with_digest(path, killed_after_the_sidecar)
    assert file_digest(path) == before and verify(path, "--ckpt_path")


def test_the_sidecar_accepts_old_and_new_until_the_new_file_is_in_place(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save(path, 1.0)
    old = file_digest(path)
    seen = []
    import selftrain.digests as digests

    real = digests.write_json_atomic

    def record(payload, target, **kwargs):
        seen.append((payload["accepted"], file_digest(path)))
        real(payload, target, **kwargs)

    monkeypatch.setattr(digests, "write_json_atomic", record)
    save(path, 2.0)
    new = file_digest(path)
    # first write: the old file is still in place and both are accepted; second: the new alone
    assert seen == [([new, old], old), ([new], new)]


class Killed(Exception):
    """A kill at a chosen point of a save."""


def killed_at_the_final_sidecar(monkeypatch) -> None:
    """Make the save's last sidecar write (after the rename) die, as a SIGKILL there would."""
    import selftrain.digests as digests

    real = digests.write_json_atomic

    def write(payload, target, **kwargs):
        if payload.get("accepted") == [digests.file_digest(target.with_name(payload["file"]))]:
            raise Killed  # the new file is in place; its sidecar still says what it said
        real(payload, target, **kwargs)

    monkeypatch.setattr(digests, "write_json_atomic", write)


def test_a_replacing_save_killed_after_its_rename_leaves_a_file_its_sidecar_accepts(
        tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save(path, 1.0)
    killed_at_the_final_sidecar(monkeypatch)
    with pytest.raises(Killed):
        save(path, 2.0)
    assert torch.load(path)["w"][0] == 2.0 and verify(path, "--ckpt_path")


def test_a_stale_sidecar_without_its_file_cannot_refuse_the_next_save(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save(path, 1.0)
    path.unlink()  # a removal killed between the checkpoint and its sidecar
    killed_at_the_final_sidecar(monkeypatch)
    with pytest.raises(Killed):
        save(path, 2.0)
    assert not sidecar(path).exists()  # the stale one went before the new file appeared
    assert verify(path, "--ckpt_path") is False  # unverified, not refused


def test_a_missing_file_is_left_to_its_reader_and_a_link_is_checked_through(tmp_path):
    path = tmp_path / "epoch=1.ckpt"
    save(path, 1.0)
    link = tmp_path / "last.ckpt"
    link.symlink_to(path.name)  # --checkpoint.save_last link
    assert verify(link, "--ckpt_path")
    flip(path, path.stat().st_size // 2)
    with pytest.raises(SelftrainError, match=r"epoch=1\.ckpt: does not match"):
        verify(link, "--ckpt_path")
    path.unlink()
    assert verify(path, "--ckpt_path") is False  # read_checkpoint_meta says it is missing


def test_a_directory_lists_every_file_and_names_the_one_that_changed(tmp_path):
    root = tmp_path / "export"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (root / "sub" / "tokenizer.json").write_text("{}")
    write_dir_digests(root)
    listed = json.loads((root / DIGESTS_FILE).read_text())["files"]
    assert sorted(listed) == ["model.safetensors", "sub/tokenizer.json"]
    assert verify(root, "--model")
    weights = root / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SelftrainError, match=r"model\.safetensors does not match its saved "
                                              r"digest .*changed on purpose\? delete "
                                              r"digests\.json"):
        verify(root, "--model")
    weights.unlink()
    with pytest.raises(SelftrainError, match=r"model\.safetensors is missing"):
        verify(root, "--model")
    assert verify(tmp_path, "--model") is False  # a dir saved without digests


def test_a_corpus_records_its_shards_digests_and_refuses_a_shard_that_lost_bits(tmp_path):
    from helpers import flip_bytes

    from selftrain.analysis.corpus_chunks import open_corpus
    from selftrain.corpus import CorpusWriter, read_corpus

    with CorpusWriter(tmp_path / "corpus", shard_size=3) as writer:
        writer.add({"id": i, "text": f"row {i}", "input_ids": [1, 2, i]} for i in range(7))
        writer.finish({"kind": "test"})
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "corpus" / "data").glob("*.parquet"))
    assert sorted(manifest["digests"]["files"]) == [f"data/{name}" for name in shards]
    assert len(read_corpus(tmp_path / "corpus")) == 7
    flip_bytes(tmp_path / "corpus" / "data" / shards[1], count=4)
    for read in (read_corpus, open_corpus):
        with pytest.raises(SelftrainError, match=rf"data/{shards[1]} does not match its saved "
                                                 r"digest \(manifest\.json\)"):
            read(tmp_path / "corpus")
