"""The GPU check kit's Python half: the wheels to carry, and the table of what a check measured.

GPU time comes in short windows, on machines that reach no package index and whose Python
lacks some of what the project needs. ``prepare.sh`` (here, with network) calls ``wheels``:
it downloads, for the GPU machine's Python and platform, the wheels of the packages that
machine lacks, at the versions this checkout's environment runs, within the size that can
travel with the working tree, and says what it left out and why. ``check.sh`` (there) installs
them offline, runs the time-boxed steps, and calls ``summarize`` to write one Markdown table
of every figure with the GPU's name and the torch and CUDA versions.

Standard library only, so it runs on either machine before anything is installed.

    python scripts/gpu/kit.py wheels --dry_run            # the plan, nothing downloaded
    python scripts/gpu/kit.py summarize --work DIR --out check.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parents[2]
WHEELS = REPO / ".gpu-wheels"
"""Where ``wheels`` puts them (git-ignored); ``check.sh`` installs from here."""
TREE_LIMIT_MIB = 64
"""What may travel to the GPU machine in all: the working tree and the wheels."""

NEEDED = [
    # (distribution, why the GPU machine needs it); in order of value: the budget takes them so
    ("transformers", "the project pins transformers >= 5.24; the GPU image may ship an older one"),
    ("huggingface-hub", "transformers >= 5.24 needs huggingface-hub >= 2.4; the image has 1.x"),
    ("httpx2", "huggingface-hub 2.x"),
    ("httpcore2", "httpx2"),
    ("truststore", "httpx2"),
    ("click", "huggingface-hub 2.x needs click >= 8.4.2"),
    ("kernels", "transformers >= 5.24"),
    ("tomlkit", "kernels"),
    ("jsonargparse", "selftrain's CLI"),
    ("docstring-parser", "jsonargparse[signatures]: --help from the Args: docstrings"),
    ("typeshed-client", "jsonargparse[signatures]"),
    ("datasets", "corpus and lm-eval data loading"),
    ("dill", "datasets"),
    ("multiprocess", "datasets"),
    ("lm-eval", "BenchmarkEval"),
    ("evaluate", "lm-eval"),
    ("pytablewriter", "lm-eval"),
    ("dataproperty", "pytablewriter"),
    ("mbstrdecoder", "pytablewriter"),
    ("pathvalidate", "pytablewriter"),
    ("tabledata", "pytablewriter"),
    ("tcolorpy", "pytablewriter"),
    ("typepy", "pytablewriter"),
    ("chardet", "mbstrdecoder"),
    ("sqlitedict", "lm-eval"),
    ("word2number", "lm-eval"),
    ("more-itertools", "lm-eval"),
    ("rouge-score", "lm-eval's metrics"),
    ("nltk", "rouge-score"),
    ("defusedxml", "nltk"),
    ("gguf", "embedded GGUF models"),
    ("bitsandbytes", "the 8-bit optimizers of the GPU tier"),
]
NOT_CARRIED = {
    "flash-attn": "its wheel (a CUDA build, hundreds of MiB) is far larger than the budget; "
                  "the check measures SDPA and records flash attention as not measured",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def tree_mib() -> float:
    """MiB of the files that travel: tracked and untracked-not-ignored ones."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True,
                            check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed
               if name and (REPO / name.decode()).is_file()) / 2**20


def local_version(name: str) -> str | None:
    """The version this checkout's environment runs (None: not installed here)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def fetch(name: str, version: str | None, python: str, into: Path) -> Path | None:
    """One wheel for the target Python and platform: a binary from the index, else one built
    here from a pure-Python sdist. None when neither works."""
    spec = f"{name}=={version}" if version else name
    binary = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
              "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
              *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
              "--dest", str(into), spec]
    built = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--no-build-isolation", "--wheel-dir", str(into), spec]
    for command in (binary, built):
        if subprocess.run(command, capture_output=True).returncode == 0:
            found = sorted(into.glob("*.whl"))
            if found and (command is binary or found[0].name.endswith("-none-any.whl")):
                return found[0]  # a wheel built here is carried only if it is pure Python
            for wheel in found:
                wheel.unlink()
    return None


def wheels(args: argparse.Namespace) -> int:
    """Download the wheels the GPU machine lacks into ``--dest``, within the budget."""
    budget = args.budget_mib if args.budget_mib is not None else (
        TREE_LIMIT_MIB - tree_mib() - 1.0)
    print(f"wheels for CPython {args.python} x86_64, budget {budget:.1f} MiB "
          f"({TREE_LIMIT_MIB} MiB that may travel, minus the working tree and 1 MiB)")
    plan = [(name, local_version(name), why) for name, why in NEEDED]
    dest = Path(args.dest)
    if args.dry_run:
        for name, version, why in plan:
            print(f"  {name}=={version or 'newest'}  ({why})")
        for name, why in NOT_CARRIED.items():
            print(f"  {name}: left out: {why}")
        return 0
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    used, kept, left = 0.0, [], []
    for name, version, why in plan:
        with tempfile.TemporaryDirectory() as scratch:
            wheel = fetch(name, version, args.python, Path(scratch))
            if wheel is None:
                left.append(f"{name}: no wheel for CPython {args.python} x86_64 and no "
                            "pure-Python sdist to build one")
                continue
            size = wheel.stat().st_size / 2**20
            if used + size > budget:
                left.append(f"{name} ({why}): {size:.1f} MiB, more than the {budget - used:.1f} "
                            "MiB left of the budget")
                continue
            shutil.move(str(wheel), dest / wheel.name)
            used += size
            kept.append(f"{wheel.name} ({size:.1f} MiB)")
    left += [f"{name}: {why}" for name, why in NOT_CARRIED.items()]
    (dest / "MANIFEST.txt").write_text("\n".join(["kept:", *kept, "left out:", *left]) + "\n")
    print(f"kept {len(kept)} wheels, {used:.1f} MiB, in {dest}")
    for line in left:
        print(f"left out: {line}")
    return 0


def _figures(value: object, prefix: str = "") -> dict[str, float]:
    """The numbers a report is about, flattened: speeds, MFU, ratios, memory, losses."""
    wanted = ("tokens_per_sec", "per_s", "mfu", "ratio", "peak", "seconds", "loss")
    if isinstance(value, dict):
        found: dict[str, float] = {}
        for key, inner in value.items():
            found.update(_figures(inner, f"{prefix}{key}."))
        return found
    if isinstance(value, int | float) and not isinstance(value, bool) and any(
            word in prefix.lower() for word in wanted):
        return {prefix.rstrip("."): float(value)}
    return {}


def summarize(args: argparse.Namespace) -> int:
    """One Markdown table of every step: its status, seconds and the figures it wrote."""
    work = Path(args.work)
    lines = [f"# GPU check: {args.gpu or 'unknown GPU'}", "",
             f"torch {args.torch or '?'}, CUDA {args.cuda or '?'}", "",
             "| step | status | seconds | figures |", "|---|---|---:|---|"]
    steps, reports = work / "steps.tsv", {}
    for row in steps.read_text().splitlines() if steps.exists() else []:
        name, status, seconds = row.split("\t")
        report, junit = work / f"{name}.json", work / f"{name}.xml"
        figures = {}
        if report.exists():
            reports[name] = json.loads(report.read_text())
            figures = _figures(reports[name])
        if junit.exists():  # pytest's counts
            suite = ElementTree.parse(junit).getroot()
            suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
            figures = {key: float(suite.get(key, 0)) for key in
                       ("tests", "failures", "errors", "skipped")}
        shown = "<br>".join(f"{key} {value:,.4g}" for key, value in figures.items())
        lines.append(f"| {name} | {status} | {seconds} | {shown or '-'} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_name("figures.json").write_text(json.dumps(reports, indent=1) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("wheels", help="download the wheels the GPU machine lacks")
    get.add_argument("--python", default="3.12", help="the GPU machine's Python (X.Y)")
    get.add_argument("--dest", default=str(WHEELS), help="folder for the wheels (replaced)")
    get.add_argument("--budget_mib", type=float, default=None,
                     help="MiB for the wheels (default: 64 minus the working tree, minus 1)")
    get.add_argument("--dry_run", action="store_true", help="print the plan only")
    table = sub.add_parser("summarize", help="the Markdown table of a check's figures")
    table.add_argument("--work", required=True, help="the check's folder of step reports")
    table.add_argument("--out", required=True, help="the Markdown file to write")
    table.add_argument("--gpu", default=None)
    table.add_argument("--torch", default=None)
    table.add_argument("--cuda", default=None)
    args = parser.parse_args()
    return wheels(args) if args.command == "wheels" else summarize(args)


if __name__ == "__main__":
    sys.exit(main())
