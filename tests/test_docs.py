"""What the docs promise: the commands they show exist as shown, and what they name is there.

The README, ``configs/README.md`` and the pages under ``docs/`` are read as a user reads them:

- every ``selftrain ...`` command in a fenced code block (also ``python -m selftrain ...``,
  ``torchrun ... -m selftrain ...`` and ``sbatch scripts/slurm_fit.sbatch ...``, which passes
  its arguments to ``selftrain fit``) names a real subcommand, and every ``--flag`` it uses is
  listed by that subcommand's ``--help``; so a renamed or removed flag fails here, and so does
  a ``--flag`` the text names in inline code that no subcommand has;
- every ``--config`` file those commands name exists in the repository;
- every ``selftrain...`` ``class_path:`` in a fenced YAML example, and every ``selftrain.x.y``
  named in inline code, names a module (and a name it defines) in the source tree; every
  repository path named in inline code exists;
- every relative Markdown link points to a file that exists (and to a heading there, when it
  names one); the file tree of ``docs/architecture.md`` names only files that exist, and every
  module of ``selftrain/`` and ``callbacks/`` has its line in it.

Nothing documented runs for real: each subcommand runs once, with ``--help``, through
``selftrain.cli.main`` in this process (``helpers.in_process``), so commands that need a GPU or
a hub model (``Qwen/...``) are checked the same way and nothing is downloaded.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from conftest import REPO
from helpers import in_process

from selftrain.cli import TOOLS, TRAINER_COMMANDS

DOCS = [REPO / "README.md", REPO / "configs" / "README.md",
        *sorted((REPO / "docs").glob("*.md"))]
"""The pages checked; CHANGELOG.md is history and may show what no longer exists."""

SUBCOMMANDS = (*TRAINER_COMMANDS, *TOOLS)
"""Every subcommand of ``selftrain``; ``test`` alone is allowed to go without an example."""

REPO_DIRS = ("selftrain", "callbacks", "configs", "scripts", "tests", "docs")


@dataclass(frozen=True)
class Command:
    """One documented ``selftrain`` command line.

    Args:
        where: ``page:line`` of its first line, for messages.
        subcommand: ``fit``, ``generate``, ...; ``""`` for ``selftrain --help``.
        args: its arguments after the subcommand.
    """

    where: str
    subcommand: str
    args: tuple[str, ...]

    @property
    def flags(self) -> set[str]:
        """``--a.b`` of ``--a.b value`` and of ``--a.b=value`` alike."""
        return {arg.split("=", 1)[0] for arg in self.args if arg.startswith("--")}

    @property
    def configs(self) -> list[str]:
        """The files given to ``--config``."""
        found = []
        for i, arg in enumerate(self.args):
            if arg.startswith("--config="):
                found.append(arg.split("=", 1)[1])
            elif arg == "--config" and i + 1 < len(self.args):
                found.append(self.args[i + 1])
        return found


def relative(page: Path) -> str:
    return str(page.relative_to(REPO))


def fenced_blocks(page: Path) -> list[tuple[int, list[str]]]:
    """``(line number of its first line, lines)`` of every fenced code block of a page."""
    blocks, current = [], None
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            if current is None:
                current = (number + 1, [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[1].append(line)
    return blocks


def prose(page: Path) -> str:
    """A page without its fenced code blocks."""
    return re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.M | re.S)


def selftrain_args(tokens: list[str]) -> list[str] | None:
    """The arguments a command line hands to ``selftrain``, or None when it runs something else."""
    if tokens and tokens[0] == "$":  # a shell prompt
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "selftrain":
        return tokens[1:]
    if tokens[0].endswith("python") or tokens[0] == "torchrun":
        for i in range(1, len(tokens) - 1):
            if tokens[i] == "-m" and tokens[i + 1] == "selftrain":
                return tokens[i + 2:]  # what comes before -m belongs to python or torchrun
        return None
    if tokens[0] == "sbatch" and "scripts/slurm_fit.sbatch" in tokens:
        return ["fit", *tokens[tokens.index("scripts/slurm_fit.sbatch") + 1:]]
    return None


@cache
def documented_commands() -> tuple[Command, ...]:
    """Every ``selftrain`` command in a fenced block of the pages, continuation lines joined."""
    commands = []
    for page in DOCS:
        for first, lines in fenced_blocks(page):
            start, logical = first, ""
            for offset, line in enumerate(lines):
                if not logical:
                    start = first + offset
                logical += line.rstrip().removesuffix("\\") + " "
                if line.rstrip().endswith("\\"):
                    continue
                args = selftrain_args(shlex.split(logical, comments=True))
                logical = ""
                if args is None:
                    continue
                subcommand = args[0] if args and not args[0].startswith("-") else ""
                commands.append(Command(f"{relative(page)}:{start}", subcommand,
                                        tuple(args[1:] if subcommand else args)))
    return tuple(commands)


def help_flags(text: str) -> set[str]:
    """The option names a ``--help`` lists (its option lines, not the prose beside them)."""
    flags = {"--help"}  # every command takes it; the top-level help does not list it
    for line in text.splitlines():
        if line.startswith("  -"):
            column = re.split(r"\s{2,}", line.strip())[0]
            flags.update(re.findall(r"--[\w.+-]+", column))
    return flags


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess[str]]:
    """``selftrain <subcommand> --help`` of every documented subcommand, through ``main`` in
    this process (:func:`helpers.in_process`: the parsers are built once, where a subprocess
    each took a minute on 2 cores)."""
    return {name: in_process(*([name] if name else []), "--help")
            for name in sorted({command.subcommand for command in documented_commands()})}


def test_every_subcommand_has_an_example():
    shown = {command.subcommand for command in documented_commands()}
    assert set(SUBCOMMANDS) - {"test"} <= shown, "no documented example of: " + ", ".join(
        sorted(set(SUBCOMMANDS) - {"test"} - shown))
    assert shown <= set(SUBCOMMANDS) | {""}, "not subcommands: " + ", ".join(
        sorted(shown - set(SUBCOMMANDS) - {""}))


@pytest.mark.parametrize("subcommand", sorted({c.subcommand for c in documented_commands()}),
                         ids=lambda name: name or "top-level")
def test_help_lists_every_documented_flag(subcommand, helps):
    commands = [c for c in documented_commands() if c.subcommand == subcommand]
    result = helps[subcommand]
    assert result.returncode == 0, result.stderr[-2000:]
    known = help_flags(result.stdout)
    unknown = [f"{c.where}: {flag}" for c in commands for flag in sorted(c.flags - known)]
    shown = " ".join(["selftrain", *([subcommand] if subcommand else []), "--help"])
    assert not unknown, f"flags `{shown}` does not list:\n" + "\n".join(unknown)


def test_top_level_help_lists_every_documented_subcommand(helps):
    listed = helps[""].stdout
    missing = sorted({c.subcommand for c in documented_commands() if c.subcommand
                      and not re.search(rf"^\s+{c.subcommand}\s", listed, flags=re.M)})
    assert not missing, "`selftrain --help` does not list: " + ", ".join(missing)


OTHER_TOOLS = {"--no-deps": "pip", "--durations": "pytest"}
"""Flags the pages name in passing that belong to another program."""


def test_flags_named_in_the_text_exist(helps):
    known = set().union(*(help_flags(result.stdout) for result in helps.values()))
    pages = [page for page in DOCS if page.name != "benchmarks.md"]  # names bench scripts' flags
    unknown = sorted({f"{relative(page)}: {flag}" for page in pages
                      for flag in re.findall(r"`(--[\w.+-]+)[^`]*`", prose(page))
                      if flag not in known and flag not in OTHER_TOOLS})
    assert not unknown, "flags no selftrain command has:\n" + "\n".join(unknown)


def test_documented_config_files_exist():
    missing = [f"{c.where}: {path}" for c in documented_commands() for path in c.configs
               if not (REPO / path).is_file()]
    assert not missing, "--config files that do not exist:\n" + "\n".join(missing)


def module_file(module: str) -> Path | None:
    """The source file of a ``selftrain`` module, found without importing it."""
    parts = module.split(".")
    if parts[:2] == ["selftrain", "callbacks"]:  # installed as selftrain.callbacks
        parts = parts[1:]
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defines(source: Path, name: str) -> bool:
    """Whether a module defines or imports ``name`` at its top level (read, not run)."""
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found = {node.name}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found = {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found = {alias.asname or alias.name.split(".")[0] for alias in node.names}
        else:
            continue
        if name in found:
            return True
    return False


def resolves(dotted: str) -> bool:
    """Whether ``selftrain.a.b`` is a module, or a module and a name it defines.

    Read from the source files, so naming ``selftrain.training.module.StudentLM`` costs no
    torch import; a dotted tail past the defined name (``Class.method``) is not followed.
    """
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        source = module_file(".".join(parts[:cut]))
        if source is not None:
            return cut == len(parts) or defines(source, parts[cut])
    return False


def test_named_classes_and_modules_exist():
    named = set()
    for page in DOCS:
        for first, lines in fenced_blocks(page):
            for offset, line in enumerate(lines):
                match = re.match(r"\s*-?\s*class_path:\s*(selftrain[\w.]*)", line)
                if match:
                    named.add((f"{relative(page)}:{first + offset}", match.group(1)))
        for dotted in re.findall(r"`(selftrain(?:\.\w+)+)(?:\([^`]*\))?`", prose(page)):
            named.add((relative(page), dotted))
    broken = sorted(f"{where}: {dotted}" for where, dotted in named if not resolves(dotted))
    assert not broken, "named, but no such module or name:\n" + "\n".join(broken)


def test_named_repository_paths_exist():
    pattern = re.compile(rf"`((?:{'|'.join(REPO_DIRS)})/[\w./=-]*)`")
    missing = [f"{relative(page)}: {path}" for page in DOCS
               for path in pattern.findall(prose(page)) if not (REPO / path).exists()]
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in prose(page).splitlines():
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            if count:
                seen[f"{base}-{count}"] = 1
    return set(seen)


def test_relative_links_resolve():
    broken = []
    for page in DOCS:
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{relative(page)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{relative(page)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


ARCHITECTURE = REPO / "docs" / "architecture.md"
"""The page whose file tree names every module (the README links to it)."""


def file_tree() -> list[str]:
    """The paths the file tree of docs/architecture.md names, rebuilt from its indentation."""
    blocks = [lines for _, lines in fenced_blocks(ARCHITECTURE)
              if any("├── " in line for line in lines)]
    assert blocks, "docs/architecture.md has no file tree"
    paths, parents = [], []
    for line in blocks[0]:
        match = re.match(r"^((?:│   |    )*)[├└]── ([^\s#]+)", line)
        if match:
            depth = len(match.group(1)) // 4
            parents[depth:] = [match.group(2).rstrip("/")]
            paths.append("/".join(parents))
    return paths


def test_the_file_tree_names_existing_files():
    missing = [path for path in file_tree() if not (REPO / path).exists()]
    assert not missing, "docs/architecture.md's tree names what is not there:\n" + "\n".join(
        missing)


def test_the_file_tree_has_every_module():
    named = set(file_tree())
    tops = (REPO / "selftrain", REPO / "callbacks")
    modules = sorted(str(path.relative_to(REPO)) for top in tops for path in top.rglob("*.py")
                     if path.name != "__init__.py" or path.parent in tops)  # stage folders: a line
    missing = [module for module in modules if module not in named]
    assert not missing, "modules without a line in docs/architecture.md's tree:\n" + "\n".join(
        missing)


TESTING = REPO / "docs" / "testing.md"
"""The page whose Files table names every test file and what it checks."""


def test_the_testing_page_lists_every_test_file():
    rows = set(re.findall(r"^\| `(tests/[^`]+)` \|", TESTING.read_text(), flags=re.M))
    files = {str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")}
    assert files <= rows, "test files without a row in docs/testing.md:\n" + "\n".join(
        sorted(files - rows))
    assert all((REPO / row).exists() for row in rows), sorted(
        row for row in rows if not (REPO / row).exists())


def test_a_test_file_is_named_after_a_module_a_package_or_a_listed_concern():
    """docs/testing.md: ``test_<name>.py`` tests module ``<name>`` (or package ``<name>``);
    the few files that test a concern across modules are the ones the page names as such."""
    named = {path.stem for top in ("selftrain", "callbacks") for path in (REPO / top).rglob("*")
             if path.suffix == ".py" or path.is_dir()}
    concerns = set(re.findall(r"^- `tests/test_(\w+)\.py`", TESTING.read_text(), flags=re.M))
    odd = sorted(path.name for path in (REPO / "tests").glob("test_*.py")
                 if path.stem[5:] not in named | concerns)
    assert not odd, "named after no module, package or listed concern: " + ", ".join(odd)
