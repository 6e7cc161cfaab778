"""selftrain.curation.held_in: real Python text minus every document an evaluation holds out."""

import json
import sysconfig

from selftrain.curation.held_in import (
    cut_at_lines,
    held_out_sources,
    pydoc_documents,
    stdlib_documents,
    write_held_in_text,
)


def test_pieces_are_whole_lines_no_longer_than_asked_and_rejoin_to_the_text():
    text = "".join(f"line {i} " * (i % 7 + 1) + "\n" for i in range(200))
    pieces = cut_at_lines(text, 120)
    assert "".join(pieces) == text
    assert all(len(piece) <= 120 and piece.endswith("\n") for piece in pieces)


def test_held_out_documents_and_canary_files_are_left_out(tmp_path):
    stdlib = sysconfig.get_paths()["stdlib"]
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"text": "x", "source": "{stdlib}/bisect.py"}) + "\n"
                    + json.dumps({"text": "y", "source": "pydoc_data.topics['assert']"}) + "\n")
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"text": "z", "source": f"{stdlib}/heapq.py#0"}) + "\n")
    held_out = held_out_sources([task, probes])
    assert held_out == {f"{stdlib}/bisect.py", "pydoc_data.topics['assert']",
                        f"{stdlib}/heapq.py"}
    sources = {source for source, _ in stdlib_documents(held_out) + pydoc_documents(held_out)}
    assert "{stdlib}/bisect.py" not in sources and "{stdlib}/heapq.py" not in sources
    assert "pydoc_data.topics['assert']" not in sources
    assert "{stdlib}/bisect.py" in {source for source, _ in stdlib_documents()}
    rows = write_held_in_text(tmp_path / "held_in.jsonl", [task, probes], max_chars=400)
    written = [json.loads(line) for line in (tmp_path / "held_in.jsonl").read_text().splitlines()]
    assert len(written) == rows > 1000
    assert {row["source"] for row in written} == sources
    assert max(len(row["text"]) for row in written if "\n" in row["text"][:-1]) <= 400


def test_package_descriptions_are_a_source_of_their_own(tmp_path):
    rows = write_held_in_text(tmp_path / "packages.jsonl", [], kind="packages")
    written = [json.loads(line) for line in (tmp_path / "packages.jsonl").read_text().splitlines()]
    assert len(written) == rows > 100
    assert all(row["source"].startswith("metadata:") for row in written)
    assert "metadata:torch" in {row["source"] for row in written}
