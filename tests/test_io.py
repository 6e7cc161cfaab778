"""selftrain.io: a reader sees the old output or the complete new one, never a part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selftrain import io
from selftrain.io import (
    TEMP_MARK,
    atomic_dir,
    atomic_file,
    publish_dir,
    staging_dir,
    swap_into_place,
    write_json_atomic,
    write_text_atomic,
)


class Boom(Exception):
    """Raised inside a write block to stand for a crash half-way."""


def make_tree(root: Path, files: dict[str, str]) -> Path:
    """A directory holding ``files`` (relative name -> text)."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def read_tree(root: Path) -> dict[str, str]:
    """Relative name -> text of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_atomic_file_replaces_the_target_through_a_temp_file_beside_it(tmp_path):
    target = tmp_path / "sub" / "result.txt"
    write_text_atomic("old", target)
    with atomic_file(target) as staging:
        assert staging.parent == target.parent and TEMP_MARK in staging.name
        staging.write_text("new")
        assert target.read_text() == "old"  # nothing visible before the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.txt"]


def test_atomic_file_error_leaves_the_target_untouched_and_no_temp_file(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(Boom), atomic_file(target) as staging:
        staging.write_text("half")
        raise Boom
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]

    missing = tmp_path / "never.txt"
    with pytest.raises(Boom), atomic_file(missing) as staging:
        staging.write_text("half")
        raise Boom
    assert not missing.exists() and [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_write_json_atomic_round_trips_with_dump_arguments(tmp_path):
    path = tmp_path / "a" / "payload.json"
    payload = {"name": "straße", "values": [1, 2.5, None], "nested": {"ok": True}}
    write_json_atomic(payload, path)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == payload and text.endswith("}\n")
    write_json_atomic({"path": tmp_path}, path, default=str, ensure_ascii=False)
    assert json.loads(path.read_text()) == {"path": str(tmp_path)}
    assert not [p for p in path.parent.iterdir() if TEMP_MARK in p.name]


def test_atomic_dir_swaps_a_complete_dir_in_over_the_old_one(tmp_path):
    target = make_tree(tmp_path / "out", {"old.txt": "old", "keep/a.txt": "a"})
    with atomic_dir(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.")
        make_tree(staging, {"new.txt": "new", "sub/b.txt": "b"})
        assert read_tree(target) == {"keep/a.txt": "a", "old.txt": "old"}
    assert read_tree(target) == {"new.txt": "new", "sub/b.txt": "b"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging, no previous left


def test_atomic_dir_keeps_the_old_dir_intact_when_the_block_raises(tmp_path):
    target = make_tree(tmp_path / "out", {"old.txt": "old"})
    with pytest.raises(Boom), atomic_dir(target) as staging:
        make_tree(staging, {"new.txt": "half"})
        raise Boom
    assert read_tree(target) == {"old.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    with pytest.raises(Boom), atomic_dir(tmp_path / "fresh") as staging:
        make_tree(staging, {"new.txt": "half"})
        raise Boom
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_dir_write_removes_the_parents_it_made_and_no_others(tmp_path):
    (tmp_path / "runs" / "old").mkdir(parents=True)
    with pytest.raises(Boom), atomic_dir(tmp_path / "runs" / "new" / "deeper" / "out") as staging:
        (staging / "part.txt").write_text("half")
        raise Boom
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["old", "runs"]  # runs/ was there
    made = io.missing_parents(tmp_path / "a" / "b" / "c")
    assert made == [tmp_path / "a" / "b", tmp_path / "a"]
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "keep.txt").write_text("not ours")
    io.remove_empty_dirs(made)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep.txt"]


def test_atomic_dir_without_replace_keeps_an_existing_target(tmp_path):
    target = tmp_path / "cache" / "model"
    with atomic_dir(target, replace=False) as staging:  # nothing there yet: it goes in
        make_tree(staging, {"weights": "first"})
    assert read_tree(target) == {"weights": "first"}

    with atomic_dir(target, replace=False) as staging:
        make_tree(staging, {"weights": "second"})
        make_tree(target, {"weights": "first"})  # another process finished first
    assert read_tree(target) == {"weights": "first"}
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_staging_dir_then_publish_dir_without_replace_reports_the_kept_target(tmp_path):
    target = make_tree(tmp_path / "out", {"a": "winner"})
    staging = make_tree(staging_dir(target), {"a": "loser"})
    assert publish_dir(staging, target, replace=False) is False
    assert read_tree(target) == {"a": "winner"} and read_tree(staging) == {"a": "loser"}
    assert publish_dir(staging, target) is True
    assert read_tree(target) == {"a": "loser"} and not staging.exists()


def test_swap_into_place_parks_the_old_output_at_previous_until_the_new_one_is_in(
        tmp_path, monkeypatch):
    target = make_tree(tmp_path / "ckpt", {"weights": "old"})
    staging = make_tree(tmp_path / ".ckpt.staging", {"weights": "new"})
    previous = make_tree(tmp_path / "ckpt-previous", {"stale": "from a killed swap"})
    seen = []
    real_fsync_dir = io.fsync_dir

    def record_then_fsync(path):  # called once the new output is in place
        seen.append((read_tree(target), read_tree(previous) if previous.exists() else None))
        real_fsync_dir(path)

    monkeypatch.setattr(io, "fsync_dir", record_then_fsync)
    assert swap_into_place(staging, target, previous=previous) is True
    assert seen == [({"weights": "new"}, {"weights": "old"})]
    assert read_tree(target) == {"weights": "new"}
    assert not previous.exists() and not staging.exists()


def test_swap_into_place_without_replace_leaves_both_alone(tmp_path):
    target = make_tree(tmp_path / "out", {"a": "kept"})
    staging = make_tree(tmp_path / ".out.staging", {"a": "new"})
    assert swap_into_place(staging, target, replace=False) is False
    assert read_tree(target) == {"a": "kept"} and read_tree(staging) == {"a": "new"}
