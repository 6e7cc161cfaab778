"""Real text every machine has, minus what an evaluation or a probe holds out.

Several parts need ordinary real text that no evaluation scores: planting trains its canaries
in among it (so the base keeps its skills, the way pretraining text surrounds a memorized
document), the SBP example pairs it, the replay control draws on it. Every machine with
Python has the documentation topics ``help()`` shows (``pydoc_data.topics``) and the standard
library's own source; every machine with this project installed also has the descriptions
(README text) of its installed packages, a domain none of the project's tasks measures. This
module cuts them into documents at whole lines and leaves out every document an evaluation or
a probe set names as its ``source``: the held-out documents of the bits-per-byte tasks and the
files the canaries were cut from.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from selftrain.io import write_text_atomic
from selftrain.probe_file import read_probe_rows

STDLIB = "{stdlib}"
"""How evaluation files name this Python's standard library in their ``source`` fields."""


def held_out_sources(files: list[str | Path]) -> set[str]:
    """Every ``source`` the rows of these jsonl / parquet files name, normalised.

    ``{stdlib}/x.py`` becomes this Python's path of ``x.py``; ``path#k`` (a probe set's
    document k of a file) becomes ``path``.

    Args:
        files: held-out task data (jsonl) and probe sets (parquet or jsonl).
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    sources: set[str] = set()
    for file in files:
        names = read_probe_rows(file, "held_out")[0].get("source") or []
        sources.update(name.split("#")[0].replace(STDLIB, stdlib) for name in names if name)
    return sources


def cut_at_lines(text: str, max_chars: int) -> list[str]:
    """``text`` as pieces of at most ``max_chars`` characters, cut at whole lines.

    Args:
        text: the document.
        max_chars: longest piece (a single longer line stays whole).
    """
    pieces, chunk = [], ""
    for line in text.splitlines(keepends=True):
        if chunk and len(chunk) + len(line) > max_chars:
            pieces.append(chunk)
            chunk = ""
        chunk += line
    if chunk.strip():
        pieces.append(chunk)
    return pieces


def pydoc_documents(held_out: set[str] = frozenset(), max_chars: int = 1500
                    ) -> list[tuple[str, str]]:
    """(source, text) of every pydoc topic not held out, cut at whole lines.

    Args:
        held_out: sources to leave out (``pydoc_data.topics['name']``).
        max_chars: longest document; a longer topic becomes several.
    """
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        source = f"pydoc_data.topics[{name!r}]"
        if source not in held_out:
            documents += [(source, piece) for piece in cut_at_lines(topics[name], max_chars)]
    return documents


def stdlib_documents(held_out: set[str] = frozenset(), max_chars: int = 1500
                     ) -> list[tuple[str, str]]:
    """(source, text) of every top-level standard-library module not held out, cut at lines.

    Args:
        held_out: absolute paths of modules to leave out.
        max_chars: longest document; a longer module becomes several.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.glob("*.py")):
        if str(path) not in held_out:
            text = path.read_text(encoding="utf-8", errors="replace")
            source = f"{STDLIB}/{path.name}"
            documents += [(source, piece) for piece in cut_at_lines(text, max_chars)]
    return documents


def package_documents(held_out: set[str] = frozenset(), max_chars: int = 1500
                      ) -> list[tuple[str, str]]:
    """(source, text) of every installed package's description (its README), cut at lines.

    Args:
        held_out: sources to leave out (``metadata:<package>``).
        max_chars: longest document; a longer description becomes several.
    """
    from importlib.metadata import distributions

    documents, seen = [], set()
    for distribution in sorted(distributions(), key=lambda d: d.metadata["Name"] or ""):
        name = distribution.metadata["Name"]
        text = distribution.metadata.get_payload() or distribution.metadata["Description"] or ""
        source = f"metadata:{name}"
        if name and name not in seen and source not in held_out and text.strip():
            seen.add(name)
            documents += [(source, piece) for piece in cut_at_lines(text, max_chars)]
    return documents


KINDS = {"python": (pydoc_documents, stdlib_documents), "packages": (package_documents,)}
"""The text each ``kind`` of :func:`write_held_in_text` is made of."""


def write_held_in_text(path: str | Path, held_out_files: list[str | Path],
                       max_chars: int = 400, kind: str = "python") -> int:
    """Write real text not held out as jsonl; how many rows.

    Args:
        path: the jsonl to write (``text`` and ``source`` per row), atomically.
        held_out_files: files whose rows' ``source`` fields name what to leave out
            (:func:`held_out_sources`).
        max_chars: longest document.
        kind: ``python`` (pydoc topics and standard-library modules) or ``packages`` (the
            installed packages' descriptions).
    """
    held_out = held_out_sources(held_out_files)
    rows = [row for documents in KINDS[kind] for row in documents(held_out, max_chars)]
    write_text_atomic("".join(json.dumps({"text": text, "source": source}) + "\n"
                              for source, text in rows), path)
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    """``python -m selftrain.curation.held_in OUT.jsonl HELD_OUT_FILE...``: write the text."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", help="the jsonl to write")
    parser.add_argument("held_out", nargs="*", help="task data / probe sets whose sources "
                                                    "are left out")
    parser.add_argument("--max_chars", type=int, default=400, help="longest document")
    parser.add_argument("--kind", choices=sorted(KINDS), default="python",
                        help="python: pydoc topics and standard-library modules; packages: "
                             "the installed packages' descriptions")
    args = parser.parse_args(argv)
    for path in args.held_out:
        if not Path(path).is_file():
            parser.error(f"held_out {path}: no such file; give the task data (jsonl) and probe "
                         "sets (parquet / jsonl) whose documents must stay out")
    rows = write_held_in_text(args.out, args.held_out, args.max_chars, args.kind)
    print(f"held-in text ({args.kind}): {rows} documents -> {args.out}")


if __name__ == "__main__":
    main()
