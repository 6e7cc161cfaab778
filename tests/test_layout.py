"""The package layout: stages import only downward, and the callbacks install under our name.

Read with ``ast``, no imports run: every ``selftrain`` import in ``selftrain/`` and
``callbacks/`` must name a stage at or below the importing module's own (the order in
``selftrain/__init__.py``'s docstring); inside the core, a module imports only the modules
before it in :data:`CORE`, and no module but the CLI's imports a subcommand's module (the
command is not a library). The callbacks folder sits at the top of the repository
but is importable only as ``selftrain.callbacks``: in this editable install, from a source
checkout that is not installed, and from a built wheel installed into a fresh venv. That wheel
ships the configs too: copied out into an empty dir, the debug config trains there.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
from helpers import evaluations, file_bytes

REPO = Path(__file__).resolve().parents[1]

STAGES = ["core", "decoding", "sampling", "curation", "synthesis", "training", "probes",
          "callbacks", "analysis", "top"]
"""Lowest first; a module may import its own stage and the ones before it."""
TOP_MODULES = {"cli", "trainer_cli", "__main__", "sweep"}
CORE = ["__init__", "errors", "io", "digests", "outputs", "shipped", "inputs", "corpus",
        "probe_file", "precision", "tiny", "embedded", "models", "provenance", "embedding"]
"""The core's flat modules, lowest first (``__init__``: the package, its version); each imports
only those before it, function-level imports too: the formats and their readers sit below
torch (``models``), what reads a loaded model above it."""
CLI_MODULES = {"selftrain.cli", "selftrain.trainer_cli", "selftrain.__main__"}
"""The modules that build the CLI: the only ones that may import a command module."""
COMMAND_IMPORTS = {
    ("selftrain.probes.plant", "selftrain.sampling.generate"):
        "plant's rehearsal text is BOS samples of the base: it runs the whole `generate` "
        "command into a temporary dir and reads the corpus back",
    ("selftrain.probes.plant", "selftrain.probes.probeset"):
        "plant writes its probe set with probeset's writer and summary (write_probe_set, "
        "summarize), the format `selftrain probeset` writes",
}
"""(importer, command module) pairs allowed for now, each with why."""


def stage_of(module: str) -> str:
    """The stage of a dotted module name under ``selftrain``."""
    parts = module.split(".")
    assert parts[0] == "selftrain", module
    if len(parts) == 1:
        return "core"
    if parts[1] in TOP_MODULES:
        return "top"
    return parts[1] if parts[1] in STAGES else "core"


def project_modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the installed package."""
    modules = {}
    for root, package in ((REPO / "selftrain", "selftrain"), (REPO / "callbacks",
                                                              "selftrain.callbacks")):
        for path in root.rglob("*.py"):
            parts = [*path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def selftrain_imports(path: Path, module: str, submodules: bool = False
                      ) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a ``selftrain`` module in a file.

    Args:
        path: the file.
        module: its dotted name (relative imports resolve against it).
        submodules: also give ``x.y`` for every ``from x import y`` (``y`` may be a module).
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                package = module.split(".")
                if path.name != "__init__.py":
                    package.pop()
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            # `from selftrain import training` imports a stage, not the core
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names
                      if submodules or (base == "selftrain" and alias.name in STAGES)]
    return [(line, name) for line, name in found if name.split(".")[0] == "selftrain"]


def test_no_stage_imports_a_later_one():
    upward = []
    for module, path in project_modules().items():
        own = STAGES.index(stage_of(module))
        for line, imported in selftrain_imports(path, module):
            if STAGES.index(stage_of(imported)) > own:
                upward.append(f"{path.relative_to(REPO)}:{line} ({stage_of(module)}) imports "
                              f"{imported} ({stage_of(imported)})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    path = tmp_path / "sampler.py"
    path.write_text("from selftrain.training.module import StudentLM\nimport selftrain.io\n"
                    "from ..probes import windows\nfrom selftrain import analysis\n")
    imports = selftrain_imports(path, "selftrain.decoding.sampler")
    assert [stage_of(name) for _, name in imports] == [
        "training", "core", "probes", "core", "analysis"]


def core_name(module: str) -> str:
    """A core module's :data:`CORE` name (``selftrain`` itself is ``__init__``)."""
    return module.split(".")[1] if "." in module else "__init__"


def core_imports_later(path: Path, module: str) -> list[str]:
    """Each core module a core module imports that is not before it in :data:`CORE`."""
    own = CORE.index(core_name(module))
    return [f"{path.relative_to(path.parents[1])}:{line} imports {imported}"
            for line, imported in selftrain_imports(path, module)
            if stage_of(imported) == "core" and CORE.index(core_name(imported)) >= own
            and imported != module]


def test_the_core_imports_only_modules_before_it():
    core = {module: path for module, path in project_modules().items()
            if stage_of(module) == "core"}
    assert sorted(core_name(module) for module in core) == sorted(CORE), (
        "list each core module in CORE, after the modules it imports")
    later = [line for module, path in core.items() for line in core_imports_later(path, module)]
    assert not later, "\n".join(later)


def test_the_core_checker_sees_a_function_level_import(tmp_path):
    path = tmp_path / "selftrain" / "corpus.py"
    path.parent.mkdir()
    path.write_text("from selftrain.io import staging_dir\n\n\ndef provenance():\n"
                    "    from selftrain.models import model_revision\n")
    assert core_imports_later(path, "selftrain.corpus") == [
        "selftrain/corpus.py:5 imports selftrain.models"]


def command_modules() -> set[str]:
    """The modules behind the subcommands (``selftrain/cli.py``'s ``TOOLS``, read with ast)."""
    for node in ast.parse((REPO / "selftrain" / "cli.py").read_text()).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TOOLS":
            return {module for module, _, _ in ast.literal_eval(node.value).values()}
    raise AssertionError("selftrain/cli.py has no TOOLS")


def test_only_the_cli_imports_a_command_module():
    """A subcommand's module is the command; what another module needs lives in a library."""
    commands = command_modules()
    assert "selftrain.sampling.generate" in commands and "selftrain.sweep.run" in commands
    found, seen = [], set()
    for module, path in project_modules().items():
        if module in CLI_MODULES:
            continue
        for line, imported in selftrain_imports(path, module, submodules=True):
            if imported in commands and imported != module:
                seen.add((module, imported))
                if (module, imported) not in COMMAND_IMPORTS:
                    found.append(f"{path.relative_to(REPO)}:{line} imports the command module "
                                 f"{imported}")
    assert not found, "\n".join(found)
    assert set(COMMAND_IMPORTS) <= seen, "an allowed import is gone: remove it from the list"


def test_the_sweep_plan_imports_no_torch():
    """Expanding a grid into commands loads no model library (and calls no stage)."""
    code = ("import sys, selftrain.sweep.plan; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_every_stage_package_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"selftrain", "selftrain.callbacks"} | {
        f"selftrain.{p.parent.name}" for p in (REPO / "selftrain").glob("*/__init__.py")}
    assert set(config["packages"]) == on_disk | {"selftrain.configs"}  # the configs, as data
    assert config["package-dir"] == {"selftrain.callbacks": "callbacks",
                                     "selftrain.configs": "configs"}
    assert set(STAGES) - {"core", "top"} == {name.split(".")[1] for name in on_disk
                                             if "." in name} - TOP_MODULES


def test_every_stage_says_what_it_may_import():
    for init in [*(REPO / "selftrain").glob("*/__init__.py"), REPO / "callbacks/__init__.py"]:
        docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in docstring, init


def import_callbacks(*python_args: str, cwd: Path, env: dict | None = None) -> str:
    """The file ``selftrain.callbacks`` is imported from, in a fresh interpreter."""
    code = ("import selftrain.callbacks as c; from selftrain.callbacks import BenchmarkEval; "
            "print(c.__file__)")
    done = subprocess.run([*python_args, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_editable_install_maps_the_callbacks_folder(tmp_path):
    assert Path(import_callbacks(sys.executable, cwd=tmp_path)) == REPO / "callbacks/__init__.py"


def test_source_checkout_finds_the_callbacks_without_an_install(tmp_path):
    """No site processing (so no editable finder): the repo on sys.path, deps appended."""
    site = sysconfig.get_paths()["purelib"]
    code = f"import sys; sys.path[:0] = [{str(REPO)!r}]; sys.path.append({site!r}); "
    bootstrap = [sys.executable, "-S", "-c", code + "exec(sys.argv[1])"]
    done = subprocess.run([*bootstrap, "import selftrain.callbacks as c; print(c.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.split()[-1]) == REPO / "callbacks/__init__.py"


@dataclass(frozen=True)
class InstalledWheel:
    """The package built as a wheel and installed into a fresh venv (:func:`installed_wheel`).

    Args:
        wheel: the built wheel.
        venv: the venv it is installed into.
        site: that venv's site-packages.
        env: the environment to run it with (no ``PYTHONPATH``).
    """

    wheel: Path
    venv: Path
    site: Path
    env: dict[str, str]

    def run(self, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """The venv's ``selftrain`` console script with ``args``, run in ``cwd``; checked."""
        done = subprocess.run([str(self.venv / "bin" / "selftrain"), *args], cwd=cwd,
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return done


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> InstalledWheel:
    """The wheel built from a copy of the repo, installed into a fresh venv (shared, slow)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source, dist = tmp / "source", tmp / "dist"  # a copy: the build writes build/
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(dist), str(source)], check=True, timeout=600,
                   capture_output=True)
    wheel = next(dist.glob("selftrain-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300, capture_output=True)
    # the dependencies come from this venv's site-packages, appended after the new venv's own
    # (a path line in a .pth file; the editable install's own .pth files are not processed)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return InstalledWheel(wheel, venv, site, env)


@pytest.mark.slow
@pytest.mark.xdist_group("wheel")  # one worker builds the wheel for both
def test_built_wheel_installs_callbacks_only_under_selftrain(installed_wheel, tmp_path):
    names = zipfile.ZipFile(installed_wheel.wheel).namelist()
    assert "selftrain/callbacks/benchmark_eval.py" in names
    assert not [name for name in names if name.startswith(("callbacks/", "configs/"))]
    assert not [name for name in names if name.startswith(("tests/", "scripts/"))]
    location = Path(import_callbacks(str(installed_wheel.venv / "bin" / "python"),
                                     cwd=tmp_path, env=installed_wheel.env))
    assert location == installed_wheel.site / "selftrain" / "callbacks" / "__init__.py"


@pytest.mark.slow
@pytest.mark.xdist_group("wheel")
def test_built_wheel_copies_its_configs_out_and_a_debug_fit_runs_there(installed_wheel,
                                                                       tmp_path):
    """From an empty dir, away from the repo: `selftrain configs`, then the debug config's fit.

    Its relative paths (the corpus, the probe set, the lm-eval tasks) resolve in the copy; two
    steps with the three evaluation callbacks: the base at step 0 and the last step.
    """
    installed_wheel.run("configs", "--out", "work", cwd=tmp_path)
    work = tmp_path / "work"
    assert file_bytes(work / "configs") == {name: data for name, data in file_bytes(
        REPO / "configs").items() if "__pycache__" not in name}
    installed_wheel.run("fit", "--config", "configs/debug.yaml", "--trainer.default_root_dir",
                        "runs/debug", "--trainer.max_steps", "2",
                        "--trainer.enable_progress_bar", "false", cwd=work)
    run = work / "runs" / "debug"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    for name in ("benchmark", "extraction", "likelihood"):
        assert evaluations(run, name) == [0, 2], name
    assert sorted(path.name for path in (run / "eval" / "benchmark").glob("*.json")) == [
        "epoch=0-step=0.json", "epoch=1-step=2.json"]


def test_the_callbacks_folder_is_not_a_top_level_package():
    """With the repo root on sys.path, ``import callbacks`` refuses and names the right path."""
    done = subprocess.run([sys.executable, "-c", "import callbacks"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "ImportError: the callbacks are imported as selftrain.callbacks" in done.stderr
