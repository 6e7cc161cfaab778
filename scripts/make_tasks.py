"""Write the data of the larger local lm-eval tasks in ``configs/tasks/selftrain_large/``.

The small project tasks (``selftrain_facts``, ``selftrain_arith``, hand-written, 40-48 items)
move in steps of 2-5 points, below the noise of a CPU-scale run. These three are sized to
resolve smaller changes of a 135M model while an evaluation of all three takes about 20-25 s on
2 CPU cores (``configs/tasks/README.md`` has the measurements):

- ``selftrain_arith_large``: one-step arithmetic ("What is 17 plus 25?") in eight kinds, from
  single digits to two-digit products, scored by log-likelihood over 4 numeric options. The 3
  wrong options share every digit but the last with the answer (42: 40-49), so an item asks for
  the last digit given the others, and lm-eval scores its 4 options in one forward pass (its
  one-token-continuation cache groups continuations that differ only in their last token).
  Exact: every item is generated here, from a seeded ``random.Random``; regenerating gives the
  same bytes on any Python 3.
- ``selftrain_bpb_pydoc``: bits per byte (rolling log-likelihood) of excerpts of the Python
  documentation this interpreter ships (``pydoc_data.topics.topics``, the text of ``help()``).
- ``selftrain_bpb_stdlib``: the same over excerpts of standard-library modules. ``json`` is
  left out: the demo's canaries (``configs/probeset/smollm2_canaries.yaml``) come from
  ``{stdlib}/json/*.py`` and the license files of installed packages.

The two text tasks depend on the Python that ran this script (the docs and modules change a
little between versions), so their jsonl files are committed and each row records the version
it came from; rerun this only to rebuild them on purpose. Each excerpt is whole lines, at most
``MAX_CHARS`` characters and at least ``MIN_CHARS``, so the documents have similar lengths and
lm-eval's unsorted batches of them carry little padding.

Standard library only. Usage, from the repository root::

    python scripts/make_tasks.py            # write all five files
    python scripts/make_tasks.py --check    # exit 1 if the arithmetic files differ from these
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "configs" / "tasks" / "selftrain_large"
"""Where the jsonl files go, next to their task YAMLs."""

SEED = 20240601
"""The seed of every random choice here (each file draws from its own ``Random``)."""

ARITH_TEST = 400
ARITH_TRAIN = 8
"""Arithmetic items: test split, and the few-shot pool (its own draws, no test question)."""

KINDS = ("add1", "add21", "add22", "sub1", "sub21", "sub22", "mul", "mul2")
"""Item kinds, drawn in turn so each is 1/8 of a split: 2+3 .. 58+37, 9-4 .. 83-27, 7*6, 14*6."""

OPS = {"add": ("plus", lambda a, b: a + b), "sub": ("minus", lambda a, b: a - b),
       "mul": ("times", lambda a, b: a * b)}

PYDOC_DOCS = 12
STDLIB_DOCS = 12
"""Documents per text task; one excerpt per pydoc topic / per module."""

MAX_CHARS = 1000
MIN_CHARS = 700
"""Bounds of an excerpt's length in characters (whole lines)."""

STDLIB_MODULES = ("argparse.py", "base64.py", "bisect.py", "calendar.py", "csv.py",
                  "dataclasses.py", "difflib.py", "fractions.py", "functools.py", "glob.py",
                  "heapq.py", "ipaddress.py", "pprint.py", "queue.py", "random.py", "shlex.py",
                  "statistics.py", "string.py", "textwrap.py", "tokenize.py")
"""Top-level pure-Python modules present in Python 3.8-3.13, never ``json``; the first
``STDLIB_DOCS`` that exist are used."""


def operands(kind: str, rng: random.Random) -> tuple[int, int]:
    """Two operands of an item of ``kind``; a subtraction's result is never negative."""
    if kind == "add1":
        return rng.randint(2, 9), rng.randint(2, 9)
    if kind == "add21":
        return rng.randint(11, 89), rng.randint(2, 9)
    if kind == "add22":
        return rng.randint(11, 89), rng.randint(11, 89)
    if kind == "sub1":
        a = rng.randint(5, 18)
        return a, rng.randint(2, min(9, a - 1))
    if kind == "sub21":
        return rng.randint(21, 99), rng.randint(2, 9)
    if kind == "sub22":
        a = rng.randint(30, 99)
        return a, rng.randint(11, a - 10)
    if kind == "mul":
        return rng.randint(2, 10), rng.randint(2, 10)
    if kind == "mul2":
        return rng.randint(11, 19), rng.randint(2, 9)
    raise ValueError(kind)


def arith_item(kind: str, rng: random.Random) -> dict:
    """One item: question, 4 options (ascending, same digits but the last), answer index."""
    a, b = operands(kind, rng)
    word, fn = OPS[kind[:3]]
    answer = fn(a, b)
    decade = answer - answer % 10
    wrong = rng.sample([decade + d for d in range(10) if decade + d != answer], 3)
    choices = sorted([answer, *wrong])
    return {"question": f"What is {a} {word} {b}?", "choices": [str(c) for c in choices],
            "answer": choices.index(answer), "kind": kind}


def arith_split(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` items, kinds in turn, no question twice nor in ``exclude``."""
    items, seen = [], set(exclude)
    while len(items) < n:
        item = arith_item(KINDS[len(items) % len(KINDS)], rng)
        if item["question"] not in seen:
            seen.add(item["question"])
            items.append(item)
    return items


def arith_rows() -> dict[str, list[dict]]:
    """The arithmetic task's splits: ``{"test": [...], "train": [...]}``."""
    test = arith_split(ARITH_TEST, random.Random(SEED))
    train = arith_split(ARITH_TRAIN, random.Random(SEED + 1),
                        exclude={item["question"] for item in test})
    return {"test": test, "train": train}


def excerpts(text: str, max_chars: int = MAX_CHARS, min_chars: int = MIN_CHARS) -> list[str]:
    """``text`` cut into runs of whole lines of ``min_chars``..``max_chars`` characters.

    A run ends before the line that would take it past ``max_chars``; runs shorter than
    ``min_chars`` (and lines longer than ``max_chars``) are dropped. Trailing whitespace of a
    run is removed, so no excerpt ends in a blank line.
    """
    runs, current = [], ""
    for line in text.splitlines(keepends=True):
        if len(current) + len(line) > max_chars:
            runs.append(current)
            current = "" if len(line) > max_chars else line
        else:
            current += line
    runs.append(current)
    runs = [run.rstrip() for run in runs]
    return [run for run in runs if min_chars <= len(run) <= max_chars]


def python_version() -> str:
    return platform.python_version()


def pydoc_rows() -> list[dict]:
    """One excerpt each of ``PYDOC_DOCS`` topics of ``help()``, drawn with a seeded Random."""
    from pydoc_data.topics import topics

    rng = random.Random(SEED + 2)
    rows = []
    for key in rng.sample(sorted(topics), len(topics)):
        found = excerpts(topics[key])
        if found:
            rows.append({"text": rng.choice(found), "source": f"pydoc_data.topics[{key!r}]",
                         "python": python_version()})
        if len(rows) == PYDOC_DOCS:
            break
    return rows


def stdlib_rows() -> list[dict]:
    """One excerpt each of the first ``STDLIB_DOCS`` modules of ``STDLIB_MODULES`` found."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(SEED + 3)
    rows = []
    for name in STDLIB_MODULES:
        path = root / name
        if not path.is_file():
            continue
        found = excerpts(path.read_text(encoding="utf-8"))
        if found:
            rows.append({"text": rng.choice(found), "source": f"{{stdlib}}/{name}",
                         "python": python_version()})
        if len(rows) == STDLIB_DOCS:
            break
    return rows


def jsonl(rows: list[dict]) -> str:
    """One JSON object a line, keys in insertion order, non-ASCII kept."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def arith_files() -> dict[str, str]:
    """File name -> content of the arithmetic task's two splits."""
    rows = arith_rows()
    return {"selftrain_arith_large_test.jsonl": jsonl(rows["test"]),
            "selftrain_arith_large_train.jsonl": jsonl(rows["train"])}


def text_files() -> dict[str, str]:
    """File name -> content of the two bits-per-byte tasks (this Python's text)."""
    return {"selftrain_bpb_pydoc.jsonl": jsonl(pydoc_rows()),
            "selftrain_bpb_stdlib.jsonl": jsonl(stdlib_rows())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write into")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the arithmetic files differ")
    args = parser.parse_args(argv)
    if args.check:
        stale = [name for name, text in arith_files().items()
                 if not (args.out / name).is_file()
                 or (args.out / name).read_text(encoding="utf-8") != text]
        for name in stale:
            print(f"{args.out / name}: differs from what make_tasks.py generates",
                  file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in {**arith_files(), **text_files()}.items():
        (args.out / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {args.out / name} ({text.count(chr(10))} rows, {len(text)} chars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
