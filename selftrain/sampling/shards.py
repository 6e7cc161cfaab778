"""A corpus dir filled shard by shard, so that a killed run resumes where it stopped.

Shard ``k`` of a corpus holds exactly the ids ``[k * shard_size, (k + 1) * shard_size)`` (the
last one fewer), and is written to a temp file and renamed: a shard file either exists whole or
not at all, whatever moment a run is killed. A rerun of the same command lists the shards
present and samples only the missing ones, so the finished corpus holds each id exactly once.
Data-parallel ranks split the missing shards among themselves the same way.

While a corpus is being filled, ``.in_progress.json`` holds the plan: the generation spec (every
setting that changes what gets sampled). A rerun with another spec is refused unless
``--overwrite``; a finished corpus carries the same spec in its manifest, which is written once,
at the end, and marks the corpus complete.

``--overwrite`` never deletes the old corpus first: the new one is filled in a hidden sibling
(``.<name>.replacement``, itself resumable by rerunning the same command) and swapped in once
complete; only then does the old one go (:func:`selftrain.io.swap_into_place`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from selftrain.corpus import (
    CORPUS_ENTRIES,
    CORPUS_MARKERS,
    DATA_DIR,
    MANIFEST_NAME,
    PLAN_NAME,
    SCHEMA,
    shard_digests,
    stamp,
)
from selftrain.errors import SelftrainError
from selftrain.inputs import read_parquet
from selftrain.io import (
    TEMP_MARK,
    is_temp_name,
    remove,
    swap_into_place,
    write_json_atomic,
    write_parquet_atomic,
)
from selftrain.outputs import refuse_beyond_disk, refuse_foreign, refuse_unwritable

MIN_SAMPLE_BYTES = 8
"""Disk one sample takes at the very least: its int64 id (its tokens and text come on top)."""


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is unreadable (the dir is then not ours)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


class ShardedCorpus:
    """The shard layout, plan and completion state of one corpus dir.

    Args:
        out: the corpus directory.
        spec: everything that determines the samples (model, sampling, seed, counts, ...).
        num_samples: total ids, ``0 .. num_samples - 1``.
        shard_size: ids per shard.
        schema: the rows' parquet schema (the corpus schema; SBP adds ``seed_id``).
    """

    def __init__(self, out: Path, spec: dict[str, Any], num_samples: int, shard_size: int,
                 schema: pa.Schema = SCHEMA):
        self.out = Path(out)
        self.target = self.out
        """Where the corpus lives once complete; ``out`` is a sibling while replacing one."""
        self.spec = spec
        self.num_samples = num_samples
        self.shard_size = shard_size
        self.num_shards = -(-num_samples // shard_size)
        self.schema = schema
        self.counts: dict[str, int] | None = None
        """The totals :meth:`finish` wrote into the manifest (None until then)."""

    # -- state of the dir ----------------------------------------------------------------------

    def existing_spec(self) -> tuple[str, dict[str, Any] | None]:
        """What ``out`` holds now: ("empty" | "complete" | "partial" | "foreign", its spec).

        Raises:
            SelftrainError: ``out`` is a file, lies under one, or cannot be written.
        """
        refuse_unwritable(self.out, beside=False)
        if not self.out.exists() or self._only_leftovers():
            return "empty", None
        manifest, plan = self.out / MANIFEST_NAME, self.out / PLAN_NAME
        if manifest.exists():
            payload = _read_json(manifest)
            return ("complete", payload.get("generation")) if payload else ("foreign", None)
        if plan.exists():
            payload = _read_json(plan)
            return ("partial", payload) if payload else ("foreign", None)
        return "foreign", None

    def _only_leftovers(self) -> bool:
        """Nothing but an empty ``data/`` and temp files: a run killed before its plan landed."""
        for entry in self.out.iterdir():
            if entry.name == DATA_DIR and entry.is_dir():
                if any(not p.name.startswith(".") for p in entry.iterdir()):
                    return False
            elif not is_temp_name(entry.name):
                return False
        return True

    def check(self, overwrite: bool, compare: tuple[str, ...] | None = None) -> str:
        """Decide what to do with ``out`` without changing it.

        Args:
            overwrite: an existing different corpus may be replaced.
            compare: spec keys to compare (None: all); lets a caller check the flags before
                loading a model and the rest after.

        Returns:
            "fresh" (start from nothing), "resume", "done" (already complete with this spec)
            or "replace" (overwrite an existing corpus).

        Raises:
            SelftrainError: ``out`` holds something else and ``overwrite`` is off.
        """
        refuse_beyond_disk(self.out, self.num_samples * MIN_SAMPLE_BYTES, "--num_samples",
                           self.num_samples, f"a corpus of that many samples ({MIN_SAMPLE_BYTES}"
                           " bytes each at the very least)")
        state, existing = self.existing_spec()
        if state == "empty":
            return "fresh"
        refuse_foreign(self.out, CORPUS_MARKERS, CORPUS_ENTRIES)
        keys = compare if compare is not None else tuple(self.spec)
        same = existing is not None and all(existing.get(key) == self.spec.get(key)
                                            for key in keys)
        if same:
            return "done" if state == "complete" else "resume"
        if overwrite:
            return "replace"
        if state == "foreign":
            raise SelftrainError(f"--out {self.out}: its manifest or plan is unreadable, so it "
                                 "is not a selftrain corpus this run can resume; choose a new "
                                 "dir or pass --overwrite true to replace it")
        differing = sorted(key for key in keys
                           if existing is None or existing.get(key) != self.spec.get(key))
        what = "a finished corpus" if state == "complete" else "an unfinished corpus"
        raise SelftrainError(f"--out {self.out} holds {what} sampled with other settings "
                             f"({', '.join(differing) or 'no recorded spec'}); rerun with the "
                             "same flags to resume, choose a new dir, or pass --overwrite true")

    def stage_replacement(self) -> str:
        """Fill a hidden sibling instead of ``out``, to be swapped in when complete.

        Call on every rank when :meth:`check` said "replace", before anything is written.

        Returns:
            "resume" when the sibling holds a replacement with this spec that a killed run
            left, else "replace" (start it afresh, clearing any other one).
        """
        self.out = self.target.with_name(f".{self.target.name}.replacement")
        state, existing = self.existing_spec()
        if state == "partial" and existing == self.spec:
            return "resume"
        return "replace"

    # -- writing ---------------------------------------------------------------------------------

    def start(self, replace: bool) -> None:
        """Create the dir and the plan; remove what ``replace`` or a killed run left behind.

        ``replace`` clears ``out``, which is then the replacement's sibling
        (:meth:`stage_replacement`), never the corpus being replaced.

        Call on one process only (rank 0), then synchronize.
        """
        if replace:
            if self.out == self.target:
                raise RuntimeError("stage_replacement() first: the old corpus is kept until "
                                   "the new one is complete")
            remove(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        leftovers = f".*{TEMP_MARK}*"
        for stale in [*self.out.glob(leftovers), *(self.out / DATA_DIR).glob(leftovers)]:
            stale.unlink(missing_ok=True)
        if not (self.out / PLAN_NAME).exists():  # the plan lands first: the dir is ours
            write_json_atomic(self.spec, self.out / PLAN_NAME)
        (self.out / DATA_DIR).mkdir(exist_ok=True)

    def complete_shards(self) -> int:
        """Shards on disk now."""
        return self.num_shards - len(self.missing_shards())

    def shard_path(self, index: int) -> Path:
        """Where shard ``index`` lives once written."""
        return self.out / DATA_DIR / f"shard-{index:05d}-of-{self.num_shards:05d}.parquet"

    def shard_ids(self, index: int) -> range:
        """The ids shard ``index`` holds."""
        return range(index * self.shard_size,
                     min((index + 1) * self.shard_size, self.num_samples))

    def missing_shards(self) -> list[int]:
        """Shards not on disk yet, in order."""
        return [k for k in range(self.num_shards) if not self.shard_path(k).exists()]

    def write_shard(self, index: int, rows: list[dict[str, Any]]) -> None:
        """Write one whole shard atomically; rows are sorted by id and must be exactly its ids."""
        rows = sorted(rows, key=lambda row: row["id"])
        if [row["id"] for row in rows] != list(self.shard_ids(index)):
            raise RuntimeError(f"shard {index} got ids that are not exactly its range")
        table = pa.Table.from_pylist([{name: row.get(name) for name in self.schema.names}
                                      for row in rows], schema=self.schema)
        write_parquet_atomic(table, self.shard_path(index))

    def finish(self, manifest: dict[str, Any]) -> Path:
        """Check every shard is there, total the counts, write the manifest, drop the plan.

        Call on one process only, after every rank has written its shards.
        """
        missing = self.missing_shards()
        if missing:
            raise SelftrainError(f"--out {self.out}: shards {missing[:5]} are missing; rerun "
                                 "the same command to sample them")
        shards = [read_parquet(self.shard_path(k), "--out", "delete that shard and rerun the "
                               "same command to sample it again",
                               columns=["id", "num_tokens", "finished"])
                  for k in range(self.num_shards)]
        table = pa.concat_tables(shards)
        ids = table.column("id").to_pylist()
        if ids != list(range(self.num_samples)):
            raise SelftrainError(f"--out {self.out}: the shards do not hold ids 0..N-1 exactly "
                                 "once; sample into a new dir")
        self.counts = counts = {
            "requested": self.num_samples, "written": len(ids),
            "finished": int(sum(table.column("finished").to_pylist())),
            "tokens": int(sum(table.column("num_tokens").to_pylist()))}
        manifest = stamp({**manifest, "counts": counts, "generation": self.spec,
                          "sharding": {"shard_size": self.shard_size,
                                       "num_shards": self.num_shards},
                          "digests": shard_digests(self.out)})
        write_json_atomic(manifest, self.out / MANIFEST_NAME)
        (self.out / PLAN_NAME).unlink(missing_ok=True)
        if self.out != self.target:  # the replacement is complete: now the old corpus goes
            swap_into_place(self.out, self.target)
            self.out = self.target
        return self.out
